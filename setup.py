from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="causalrec",
    version="0.1.0",
    description="Causal recommendation at data-platform scale: Spark + Delta + Ray Train",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["causalrec", "causalrec.*"]),
    install_requires=requirements,
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "duckdb>=1.1"],
        "mlflow": ["mlflow-skinny>=2.10"],
    },
    entry_points={"console_scripts": ["causalrec=causalrec.cli:console_main"]},
    include_package_data=True,
)
