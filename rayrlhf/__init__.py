"""rayrlhf: InstructGPT-style RLHF (PPO) on Ray with vLLM rollouts and DeepSpeed trainers."""

__version__ = "0.1.0"
