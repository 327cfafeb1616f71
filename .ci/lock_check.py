"""Check that requirements.lock still answers pyproject.toml: every dependency the project declares
(and its dev extra) is locked, at a version its specifier allows. Prints one line and exits 1 when not.

Runs with any python3 before .venv exists, so it uses the `packaging` library pip itself carries when
the interpreter has no copy of its own.
"""
import re
import sys
import tomllib

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a bare interpreter: pip vendors the same library
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

LOCKED_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def declared_requirements(pyproject_path: str) -> list[Requirement]:
    with open(pyproject_path, "rb") as f:
        project = tomllib.load(f)["project"]
    specs = list(project.get("dependencies", []))
    specs += project.get("optional-dependencies", {}).get("dev", [])
    return [Requirement(spec) for spec in specs]


def locked_versions(lock_path: str) -> dict[str, list[str]]:
    versions: dict[str, list[str]] = {}
    with open(lock_path, encoding="utf-8") as f:
        for line in f:
            match = LOCKED_LINE.match(line)
            if match:
                versions.setdefault(canonicalize_name(match[1]), []).append(match[2])
    return versions


def lock_disagreements(pyproject_path: str, lock_path: str) -> list[str]:
    locked = locked_versions(lock_path)
    problems = []
    for requirement in declared_requirements(pyproject_path):
        name = canonicalize_name(requirement.name)
        if name not in locked:
            problems.append(f"{requirement} is not in the lock")
            continue
        for version in locked[name]:
            if not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{requirement} but the lock has {name}=={version}")
    return problems


if __name__ == "__main__":
    pyproject_path, lock_path = sys.argv[1:3]
    problems = lock_disagreements(pyproject_path, lock_path)
    if problems:
        print(f"{lock_path} is out of date: pyproject.toml asks for {'; '.join(problems)}. "
              f"Run `make lock` and commit {lock_path}.", file=sys.stderr)
        sys.exit(1)
    print(f"{lock_path} agrees with {pyproject_path}")
