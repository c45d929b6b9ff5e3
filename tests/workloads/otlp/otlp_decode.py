"""Decodes OTLP profiles export requests with OpenTelemetry's own Python
bindings (PyPI `opentelemetry-proto`, installed by `cargo xtask setup`),
independently of the profiler's Rust code, and prints what they hold as
JSON.

    otlp_decode.py FILE...   each FILE one serialized
                             ExportProfilesServiceRequest

Each request is checked first, as OTLP profiles (v1development, OTLP 1.10)
require and the agent promises: every dictionary table present with the
zero value at index 0, every index in range, one value a sample, positive.
A request that breaks a rule is named with the rule on stderr, and the exit
status is 1.

The output folds the stacks back the way the agent unfolded them
(profiler-agent/src/export/otlp.rs): root first, the resource's
`process.executable.name` as the root frame, a location's lines outermost
first with every line after the first marked inlined (`_[i]`), the first
one marked with its `profile.frame.type` (`_[k]` kernel, `_[j]` jit):

    {"requests": N, "bytes": [size of each request],
     "profiles": {"TYPE/UNIT": {"profiles": N, "samples": N, "total": N,
                                "stacks": {"proc;main;f": VALUE, ...}}},
     "resources": [{"host.name": "...", "process.pid": 42, ...}, ...]}
"""

import json
import sys

from opentelemetry.proto.collector.profiles.v1development import (
    profiles_service_pb2,
)

FRAME_SUFFIX = {"kernel": "_[k]", "jit": "_[j]"}
TABLES = (
    "mapping_table",
    "location_table",
    "function_table",
    "link_table",
    "string_table",
    "attribute_table",
    "stack_table",
)


class Invalid(Exception):
    """A rule the request breaks."""


def check_index(index, table, length, where):
    if not 0 <= index < length:
        raise Invalid(f"{where} {index} out of range ({table} has {length} entries)")
    return index


def any_value(value, strings, where):
    """An AnyValue as a JSON value (a string, int, float or bool)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "string_value_strindex":
        i = check_index(value.string_value_strindex, "string_table", len(strings), where)
        return strings[i]
    if kind in ("array_value", "kvlist_value", "bytes_value"):
        return f"<{kind}>"
    return getattr(value, kind)


class Request:
    def __init__(self, request):
        self.request = request
        d = request.dictionary
        if not request.HasField("dictionary"):
            raise Invalid("the request has no dictionary")
        self.d = d
        for table in TABLES:
            entries = getattr(d, table)
            if len(entries) == 0:
                raise Invalid(f"dictionary.{table} is empty: index 0 must hold the zero value")
            zero = entries[0]
            is_zero = zero == "" if table == "string_table" else zero.ByteSize() == 0
            if not is_zero:
                raise Invalid(f"dictionary.{table}[0] is not the zero value: {zero!r}")
        self.strings = list(d.string_table)
        self.check_tables()

    def string(self, index, where):
        return self.strings[check_index(index, "string_table", len(self.strings), where)]

    def attribute_indices(self, indices, where):
        for n, index in enumerate(indices):
            check_index(index, "attribute_table", len(self.d.attribute_table),
                        f"{where}.attribute_indices[{n}]")

    def check_tables(self):
        d = self.d
        for i, m in enumerate(d.mapping_table):
            self.string(m.filename_strindex, f"dictionary.mapping_table[{i}].filename_strindex")
            self.attribute_indices(m.attribute_indices, f"dictionary.mapping_table[{i}]")
        for i, loc in enumerate(d.location_table):
            where = f"dictionary.location_table[{i}]"
            check_index(loc.mapping_index, "mapping_table", len(d.mapping_table),
                        f"{where}.mapping_index")
            for n, line in enumerate(loc.lines):
                check_index(line.function_index, "function_table", len(d.function_table),
                            f"{where}.lines[{n}].function_index")
            self.attribute_indices(loc.attribute_indices, where)
        for i, f in enumerate(d.function_table):
            where = f"dictionary.function_table[{i}]"
            self.string(f.name_strindex, f"{where}.name_strindex")
            self.string(f.system_name_strindex, f"{where}.system_name_strindex")
            self.string(f.filename_strindex, f"{where}.filename_strindex")
        for i, a in enumerate(d.attribute_table):
            where = f"dictionary.attribute_table[{i}]"
            self.string(a.key_strindex, f"{where}.key_strindex")
            self.string(a.unit_strindex, f"{where}.unit_strindex")
            any_value(a.value, self.strings, f"{where}.value.string_value_strindex")
        for i, s in enumerate(d.stack_table):
            for n, loc in enumerate(s.location_indices):
                check_index(loc, "location_table", len(d.location_table),
                            f"dictionary.stack_table[{i}].location_indices[{n}]")

    def frame_type(self, location):
        """A location's `profile.frame.type`, or None."""
        for index in location.attribute_indices:
            a = self.d.attribute_table[index]
            if self.strings[a.key_strindex] == "profile.frame.type":
                return any_value(a.value, self.strings, "profile.frame.type")
        return None

    def location_frames(self, index):
        """A location's frames, outermost first."""
        location = self.d.location_table[index]
        if not location.lines:
            raise Invalid(f"dictionary.location_table[{index}] has no lines "
                          "(the agent names every frame)")
        suffix = FRAME_SUFFIX.get(self.frame_type(location), "")
        names = [self.strings[self.d.function_table[line.function_index].name_strindex]
                 for line in location.lines]
        # Lines are innermost first: the last one is the location's own frame.
        outermost = names[::-1]
        return [outermost[0] + suffix] + [name + "_[i]" for name in outermost[1:]]

    def folded(self, stack_index, root):
        """A stack, root first, under `root` (the process) when there is one."""
        frames = [root] if root is not None else []
        for location in reversed(self.d.stack_table[stack_index].location_indices):
            frames.extend(self.location_frames(location))
        return ";".join(frames) if frames else "[unknown]"


def resource_attributes(resource_profiles, strings, where):
    attributes = {}
    for n, kv in enumerate(resource_profiles.resource.attributes):
        key = kv.key or strings[check_index(kv.key_strindex, "string_table", len(strings),
                                            f"{where}.attributes[{n}].key_strindex")]
        if key in attributes:
            raise Invalid(f"{where}: attribute {key!r} twice")
        attributes[key] = any_value(kv.value, strings, f"{where}.attributes[{n}].value")
    return attributes


def decode(paths):
    out = {"requests": 0, "bytes": [], "profiles": {}, "resources": []}
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        message = profiles_service_pb2.ExportProfilesServiceRequest()
        message.ParseFromString(data)
        try:
            request = Request(message)
            decode_request(request, out)
        except Invalid as e:
            raise Invalid(f"{path}: {e}") from None
        out["requests"] += 1
        out["bytes"].append(len(data))
    return out


def decode_request(request, out):
    d = request.d
    strings = request.strings
    for r, rp in enumerate(request.request.resource_profiles):
        where = f"resource_profiles[{r}]"
        attributes = resource_attributes(rp, strings, f"{where}.resource")
        if attributes not in out["resources"]:
            out["resources"].append(attributes)
        root = attributes.get("process.executable.name")
        for s, sp in enumerate(rp.scope_profiles):
            for p, profile in enumerate(sp.profiles):
                path = f"{where}.scope_profiles[{s}].profiles[{p}]"
                if not profile.HasField("sample_type"):
                    raise Invalid(f"{path}.sample_type is missing")
                sample_type = "{}/{}".format(
                    request.string(profile.sample_type.type_strindex,
                                   f"{path}.sample_type.type_strindex"),
                    request.string(profile.sample_type.unit_strindex,
                                   f"{path}.sample_type.unit_strindex"),
                )
                if profile.HasField("period_type"):
                    request.string(profile.period_type.type_strindex,
                                   f"{path}.period_type.type_strindex")
                    request.string(profile.period_type.unit_strindex,
                                   f"{path}.period_type.unit_strindex")
                request.attribute_indices(profile.attribute_indices, path)
                entry = out["profiles"].setdefault(
                    sample_type, {"profiles": 0, "samples": 0, "total": 0, "stacks": {}})
                entry["profiles"] += 1
                for n, sample in enumerate(profile.samples):
                    spath = f"{path}.samples[{n}]"
                    stack = check_index(sample.stack_index, "stack_table", len(d.stack_table),
                                        f"{spath}.stack_index")
                    check_index(sample.link_index, "link_table", len(d.link_table),
                                f"{spath}.link_index")
                    request.attribute_indices(sample.attribute_indices, spath)
                    if len(sample.values) != 1 or sample.values[0] <= 0:
                        raise Invalid(f"{spath}.values {list(sample.values)}: "
                                      "the agent sends one positive value a sample")
                    folded = request.folded(stack, root)
                    value = sample.values[0]
                    entry["samples"] += 1
                    entry["total"] += value
                    entry["stacks"][folded] = entry["stacks"].get(folded, 0) + value


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: otlp_decode.py FILE...")
    try:
        out = decode(sys.argv[1:])
    except Invalid as e:
        sys.exit(f"invalid OTLP request: {e}")
    json.dump(out, sys.stdout, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
