import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# Python runs this line at every interpreter start (site-packages .pth): it appends our trainers folder
# to nnUNet_extTrainer, so that stock nnUNetv2_train finds nnUNetTrainerMACL with no per-shell step.
# Switched off by MACL_REGISTER_TRAINERS=0; nnunetv2_macl/startup_hook.py says more.
TRAINERS_PTH = "nnunetv2_macl-trainers.pth"
TRAINERS_PTH_LINE = "import nnunetv2_macl.startup_hook as h; h.register_trainers()\n"


class BuildPyWithTrainersPth(build_py):
    """build_py that also writes the startup .pth to the root of what gets installed.

    A wheel installs the top of ``build_lib`` into site-packages; an editable install (PEP 660) does
    not copy ``build_lib``, but installs the top of the unpacked wheel, which is ``install_lib`` then.
    """

    def run(self) -> None:
        super().run()
        target = self.build_lib
        if getattr(self, "editable_mode", False):
            target = self.distribution.get_command_obj("install").install_lib
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, TRAINERS_PTH), "w") as f:
            f.write(TRAINERS_PTH_LINE)


setup(
    name="nnunetv2-macl",
    version="0.3.0",
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
    cmdclass={"build_py": BuildPyWithTrainersPth},
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
