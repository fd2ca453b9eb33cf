from setuptools import find_packages, setup

setup(
    name="mindspeed-cp",
    version="0.1.0",
    description="Context parallelism (Ulysses, Ring, Double Ring, Hybrid) for Megatron as a plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mindspeed_cp", "mindspeed_cp.*"]),
    package_data={"mindspeed_cp.planner": ["devices/*.json"]},  # mindspeed-cp plan's device presets
    python_requires=">=3.10",
    # torch is deliberately not pinned here: users bring their own CUDA/NPU build.
    install_requires=["torch>=2.1", "megatron-core>=0.12"],
    extras_require={"test": ["pytest>=7", "numpy"], "plot": ["matplotlib"]},
    entry_points={"console_scripts": ["mindspeed-cp=mindspeed_cp.tools.cli:main"]},
)
