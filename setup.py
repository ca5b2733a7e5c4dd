from setuptools import find_packages, setup

setup(
    name="megatron_mxn",
    version="0.1.0",
    description="Head-group x dim-slice grid attention for Megatron-LM / megatron-core",
    packages=find_packages(include=["megatron_mxn", "megatron_mxn.*"]),
    python_requires=">=3.12",
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.19,<0.20",
        "psutil",  # dist-checkpointing's writer logs process memory through it
        "PyYAML",
    ],
    extras_require={
        "test": ["pytest"],
        # megatron_mxn.convert reads/writes safetensors; transformers and tokenizers are the
        # reference of its tests and Megatron's HuggingFaceTokenizer
        "hf": ["safetensors>=0.4", "transformers>=5.0", "tokenizers>=0.21"],
    },
)
