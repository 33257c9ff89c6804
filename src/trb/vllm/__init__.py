"""Rollouts on vLLM: the blend model that samples a behavior policy's distribution inside vLLM (`blend`, registered
through vLLM's plugin entry point by `plugin`), the adapter from trb's policies to that distribution (`behavior`),
and the engine that turns vLLM's completions into trb's `Rollout` record (`engine`). Only `blend` imports vLLM at
import time."""
