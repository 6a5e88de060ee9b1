"""Helpers of tests/tests/deploy.rs, run by the Python of the pinned tools
(target/tools/python, installed by `cargo xtask setup`).

Usage: python tools.py COMMAND, with a JSON request on standard input and a
JSON answer on standard output:
  yaml        {"text"}                  -> the documents of a YAML stream
  versions    {}                        -> the Kubernetes versions with schemas
  kubernetes  {"documents", "versions"} -> per document and version: passed,
              invalid (with the first error) or no-schema (strict schemas)
  schema      {"schema", "documents"}   -> per document, the JSON Schema errors
  dockerfile  {"text"}                  -> the instructions, parsed by
              BuildKit's own parser
"""

import json
import sys


def yaml_documents(request):
    import yaml

    return [doc for doc in yaml.safe_load_all(request["text"]) if doc is not None]


def versions(_request):
    from kubernetes_validate import utils

    return list(dict.fromkeys(utils.all_versions()))


def kubernetes(request):
    from kubernetes_validate import utils

    answers = []
    for document in request["documents"]:
        outcomes = {}
        for version in request["versions"]:
            try:
                utils.validate(document, version, strict=True)
                outcomes[version] = {"outcome": "passed"}
            except utils.SchemaNotFoundError as err:
                outcomes[version] = {"outcome": "no-schema", "message": err.message}
            except utils.ValidationError as err:
                path = ".".join(str(part) for part in err.path)
                outcomes[version] = {"outcome": "invalid", "message": f"{path}: {err.message}"}
        answers.append(outcomes)
    return answers


def schema(request):
    import jsonschema

    validator = jsonschema.Draft202012Validator(request["schema"])
    validator.check_schema(request["schema"])
    return [
        sorted(
            f"{'.'.join(str(part) for part in err.path)}: {err.message}"
            for err in validator.iter_errors(document)
        )
        for document in request["documents"]
    ]


def dockerfile(request):
    import dockerfile as parser

    return [
        {
            "cmd": command.cmd.upper(),
            "flags": list(command.flags),
            "value": list(command.value),
            "json": command.json,
            "line": command.start_line,
        }
        for command in parser.parse_string(request["text"])
    ]


COMMANDS = {
    "yaml": yaml_documents,
    "versions": versions,
    "kubernetes": kubernetes,
    "schema": schema,
    "dockerfile": dockerfile,
}

if __name__ == "__main__":
    json.dump(COMMANDS[sys.argv[1]](json.load(sys.stdin)), sys.stdout)
