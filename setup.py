from setuptools import find_packages, setup

setup(
    name="nnunetv2-macl",
    version="0.2.0",
    description="MACL self-supervised pretraining for nnU-Net v2 (multi-level asymmetric contrastive learning)",
    long_description=open("README.md").read() if __import__("os").path.isfile("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["nnunetv2_macl", "nnunetv2_macl.*"]),
    python_requires=">=3.10",
    install_requires=[
        "nnunetv2>=2.8",
        "torch>=2.1",
        "dynamic-network-architectures",
        "batchgeneratorsv2",
        "SimpleITK",
        "acvl-utils",
        "numpy",
        "matplotlib",
        "tqdm",
    ],
    entry_points={
        "console_scripts": [
            "macl_pretrain=nnunetv2_macl.run.pretrain:main",
            "macl_trainer_path=nnunetv2_macl.run.trainer_path:main",
            "macl_demo=nnunetv2_macl.demo.pipeline:main",
            "macl_prepare_unlabeled=nnunetv2_macl.run.prepare_unlabeled:main",
            "macl_diagnose=nnunetv2_macl.run.diagnose:main",
            "macl_fewlabel=nnunetv2_macl.run.fewlabel:main",
            "macl_cpu_plan=nnunetv2_macl.run.cpu_plan:main",
        ]
    },
)
