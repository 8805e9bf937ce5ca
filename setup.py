from pathlib import Path

from setuptools import find_packages, setup

version = {}
for line in Path("openmythos/__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="openmythos",
    version=version["__version__"],
    description="OpenMythos Recurrent-Depth (looped) Transformer as a Hugging Face Transformers model",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["openmythos", "openmythos.*"]),
    package_data={"openmythos": ["py.typed", "data/*.txt", "templates/*.md"]},
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned loosely on purpose; install the build you want (CPU or CUDA) first.
        "torch>=2.6",
        "transformers>=5.23,<5.25",  # 5.23 and 5.24 tested (5.24 renamed past_key_values to cache)
        "safetensors>=0.4",
        "accelerate>=1.0",
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "train": ["datasets>=3.0", "peft>=0.17", "tqdm"],
        "demo": ["datasets>=3.0", "matplotlib>=3.7"],
        # `mythos serve`: what transformers' own `serving` extra installs, less torch and accelerate
        "serve": ["fastapi", "uvicorn", "openai>=1.98", "pydantic>=2", "starlette", "rich"],
        "eval": ["lm-eval>=0.4.8,<0.5"],  # `lm_eval --model hf` (docs/evaluation.md)
        # the serving and lm-eval tests need both; lm-eval adds about 80 s to a fresh install (docs/evaluation.md)
        "test": ["pytest>=8", "pytest-xdist>=3.8", "datasets>=3.0", "peft>=0.17", "matplotlib>=3.7",
                 "transformers-mlinter==0.1.5",
                 "fastapi", "uvicorn", "openai>=1.98", "pydantic>=2", "starlette", "rich", "lm-eval>=0.4.8,<0.5"],
    },
    entry_points={"console_scripts": ["mythos=openmythos.cli:main"]},
)
