"""Per-method rollout diagnostics of a comparison, from its committed records (metrics.jsonl.gz), means over seeds:
mean beta, realized KL and share of teacher tokens at step 1, share of positions at beta = 1 at step 40, the last
step with any blending, and teacher entropy at steps 1 and 10. The numbers quoted under RESULTS.md's method tables.

    python studies/method_diagnostics.py results/miniature/arith/methods
"""
import gzip,json,sys,glob,statistics as st
base=sys.argv[1]
for v in sorted(glob.glob(base+'/runs/*')):
    name=v.split('/')[-1]
    seeds=sorted(glob.glob(v+'/seed_*/metrics.jsonl.gz'))
    per={}
    for f in seeds:
        for l in gzip.open(f):
            r=json.loads(l)
            if 'loss' in r: per.setdefault(r['step'],[]).append(r)
    def m(step,key):
        rs=[r.get(key) for r in per.get(step,[]) if r.get(key) is not None]
        return round(st.mean(rs),3) if rs else None
    last_beta=max([s for s in per if any(r.get('rollout/mean_beta',0)>0 for r in per[s])] or [0])
    print(name, len(seeds), 'beta1', m(1,'rollout/mean_beta'), 'rkl1',m(1,'rollout/realized_kl'), 'fracb1@40',m(40,'rollout/frac_beta_one'), 'fromT1',m(1,'rollout/from_teacher'),'last step with beta>0',last_beta, 'Hteach1',m(1,'teacher_entropy'), 'Hteach10', m(10,'teacher_entropy'))
