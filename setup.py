"""Map the repository folders onto import names.

`core/` is `modalforge`, `plugins/` is `modalforge.plugins` and `conf/` is
`modalforge.conf` (YAML shipped as package data). setuptools cannot express
"every subpackage of a renamed folder" in pyproject.toml alone, so the list is
computed here; everything else lives in pyproject.toml.
"""

from setuptools import find_namespace_packages, find_packages, setup

ROOTS = {"modalforge": "core", "modalforge.plugins": "plugins", "modalforge.conf": "conf"}


def _packages() -> list[str]:
    names = []
    for name, folder in ROOTS.items():
        finder = find_namespace_packages if folder == "conf" else find_packages
        names.append(name)
        names += [f"{name}.{sub}" for sub in finder(folder)]
    # plugin config folders hold YAML only; ship them as namespace data packages
    names += [f"modalforge.plugins.{sub}" for sub in find_namespace_packages("plugins") if ".conf" in f".{sub}"]
    return sorted(set(names))


setup(
    packages=_packages(),
    package_dir=ROOTS,
    package_data={"": ["*.yaml", "*.jinja", "*.md", "*.json"]},
    include_package_data=True,
)
