from setuptools import find_packages, setup

setup(
    name="fusion",
    version="0.1.0",
    description="DeepSpeed trainer fusing several source LLMs into one target LLM",
    packages=find_packages(include=["fusion", "fusion.*"]),
    python_requires=">=3.10",
    # Ranges are the ones tested; torch 2.13.0 is the CPU wheel here and the CUDA build on a cluster.
    install_requires=[
        "torch>=2.13,<2.14",
        "deepspeed>=0.19.8,<0.20",
        "transformers>=5.23,<6",
        "accelerate>=1.1,<2",  # transformers needs it to build ZeRO-3-partitioned models (HfDeepSpeedConfig)
        "datasets>=5.2,<6",
        "tokenizers>=0.23,<0.24",
        "sentencepiece>=0.2.1,<0.3",
        "protobuf>=5,<8",
        "gguf>=0.19,<0.20",
        "rapidfuzz>=3.14,<4",
        "numpy>=2.0,<3",
        "pyyaml>=6,<7",
        "tensorboard>=2.20,<3",
        "tqdm>=4.67,<5",
        "matplotlib>=3.10,<4",
    ],
    extras_require={
        "dev": ["pytest>=9,<10", "pytest-timeout>=2.3,<3", "hypothesis>=6.150,<7"],
    },
)
