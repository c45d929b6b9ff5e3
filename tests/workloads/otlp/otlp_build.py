"""Builds an OTLP profiles export request with OpenTelemetry's own Python
bindings (PyPI `opentelemetry-proto`, installed by `cargo xtask setup`),
independently of the profiler's Rust code, sends it to a collector over
OTLP/HTTP, and prints what the collector should serve back.

    otlp_build.py HOST:PORT [HOST_NAME]

POSTs the request to http://HOST:PORT/v1development/profiles
(application/x-protobuf), checks the answer is 200 with an
ExportProfilesServiceResponse that rejects nothing, and prints JSON:

    {"node": HOST_NAME, "process": "...", "pid": N, "bytes": N,
     "types": {"cpu": {"folded stack": VALUE, ...}, "off_cpu": {...}},
     "threads": {"worker-1": {"cpu": TOTAL, "off_cpu": TOTAL}, ...}}

where each folded stack is root first under the process name (the
collector's mapping: the `process.executable.name` as root, kernel frames
`_[k]`, inlined lines `_[i]` after their caller), values summed by stack.
The request: one resource (host.name, service.name,
process.executable.name, process.pid), a `cpu`/`samples` profile
(period_type cpu/nanoseconds, period 10101010: 99 Hz) of three stacks (one
with kernel frames, one with an inlined line) whose samples of one stack
on two threads are summed, and an `off_cpu`/`nanoseconds` profile; both
start 30 s ago and last 10 s.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request

from opentelemetry.proto.collector.profiles.v1development import (
    profiles_service_pb2,
)
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.profiles.v1development import profiles_pb2
from opentelemetry.proto.resource.v1 import resource_pb2

PROCESS = "otlp-built"
PID = 4242


class Dictionary:
    """The request's tables, each entry once, the zero value at index 0."""

    def __init__(self):
        self.d = profiles_pb2.ProfilesDictionary()
        self.d.string_table.append("")
        self.d.mapping_table.add()
        self.d.location_table.add()
        self.d.function_table.add()
        self.d.link_table.add()
        self.d.attribute_table.add()
        self.d.stack_table.add()
        self.strings = {"": 0}
        self.functions = {}
        self.locations = {}
        self.attributes = {}
        self.stacks = {}

    def string(self, s):
        if s not in self.strings:
            self.strings[s] = len(self.d.string_table)
            self.d.string_table.append(s)
        return self.strings[s]

    def attribute(self, key, value):
        k = (key, value)
        if k not in self.attributes:
            self.attributes[k] = len(self.d.attribute_table)
            a = self.d.attribute_table.add()
            a.key_strindex = self.string(key)
            a.value.string_value = value
        return self.attributes[k]

    def function(self, name):
        if name not in self.functions:
            self.functions[name] = len(self.d.function_table)
            self.d.function_table.add().name_strindex = self.string(name)
        return self.functions[name]

    def location(self, frame_type, lines):
        """A location whose lines are `lines` (function names, innermost
        first) of kind `frame_type`."""
        k = (frame_type, tuple(lines))
        if k not in self.locations:
            self.locations[k] = len(self.d.location_table)
            loc = self.d.location_table.add()
            for name in lines:
                loc.lines.add().function_index = self.function(name)
            loc.attribute_indices.append(self.attribute("profile.frame.type", frame_type))
        return self.locations[k]

    def stack(self, locations):
        """A stack of `locations` (leaf first)."""
        k = tuple(locations)
        if k not in self.stacks:
            self.stacks[k] = len(self.d.stack_table)
            self.d.stack_table.add().location_indices.extend(locations)
        return self.stacks[k]


def build(host_name):
    d = Dictionary()
    native = lambda *lines: d.location("native", list(lines))  # noqa: E731
    kernel = lambda name: d.location("kernel", [name])  # noqa: E731
    main = native("main")
    # Leaf first. The expected folded stacks (root first) say the same.
    work = d.stack([native("compute"), native("work"), main])
    # `parse` inlined into `load`, `load` into `handle`: one location whose
    # lines go innermost first.
    inlined = d.stack([native("parse", "load", "handle"), main])
    syscall = d.stack([kernel("vfs_read"), kernel("entry_SYSCALL_64"),
                       native("read"), native("work"), main])
    wait = d.stack([kernel("schedule"), kernel("futex_wait"), native("wait"), main])
    expected = {
        "cpu": {
            f"{PROCESS};main;work;compute": 7 + 5,
            f"{PROCESS};main;handle;load_[i];parse_[i]": 3,
            f"{PROCESS};main;work;read;entry_SYSCALL_64_[k];vfs_read_[k]": 4,
        },
        "off_cpu": {
            f"{PROCESS};main;wait;futex_wait_[k];schedule_[k]": 2_500_000,
            f"{PROCESS};main;work;read;entry_SYSCALL_64_[k];vfs_read_[k]": 750_000,
        },
    }

    # Each thread's total by type: its samples are its own.
    threads = {
        "worker-1": {"cpu": 7 + 3, "off_cpu": 2_000_000 + 750_000},
        "worker-2": {"cpu": 5 + 4, "off_cpu": 500_000},
    }

    now = time.time_ns()
    start, duration = now - 30_000_000_000, 10_000_000_000
    request = profiles_service_pb2.ExportProfilesServiceRequest()
    rp = request.resource_profiles.add()
    for key, value in [("host.name", host_name), ("service.name", "otlp-build"),
                       ("process.executable.name", PROCESS)]:
        kv = rp.resource.attributes.add()
        kv.key = key
        kv.value.string_value = value
    kv = rp.resource.attributes.add()
    kv.key = "process.pid"
    kv.value.int_value = PID
    sp = rp.scope_profiles.add()
    sp.scope.name = "otlp_build.py"
    sp.scope.version = "1"

    def profile(type_name, unit, samples, id_byte):
        p = sp.profiles.add()
        p.sample_type.type_strindex = d.string(type_name)
        p.sample_type.unit_strindex = d.string(unit)
        p.time_unix_nano = start
        p.duration_nano = duration
        p.profile_id = bytes([id_byte]) * 16
        for stack, thread, value in samples:
            s = p.samples.add()
            s.stack_index = stack
            s.attribute_indices.append(d.attribute("thread.name", thread))
            s.values.append(value)
        return p

    cpu = profile("cpu", "samples",
                  [(work, "worker-1", 7), (work, "worker-2", 5), (inlined, "worker-1", 3),
                   (syscall, "worker-2", 4)], 1)
    cpu.period_type.type_strindex = d.string("cpu")
    cpu.period_type.unit_strindex = d.string("nanoseconds")
    cpu.period = 10_101_010
    profile("off_cpu", "nanoseconds",
            [(wait, "worker-1", 2_000_000), (wait, "worker-2", 500_000),
             (syscall, "worker-1", 750_000)], 2)
    request.dictionary.CopyFrom(d.d)
    return request, expected, threads


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: otlp_build.py HOST:PORT [HOST_NAME]")
    addr = sys.argv[1]
    host_name = sys.argv[2] if len(sys.argv) == 3 else f"otlp-build-{os.getpid()}"
    request, expected, threads = build(host_name)
    body = request.SerializeToString()
    http = urllib.request.Request(
        f"http://{addr}/v1development/profiles",
        data=body,
        method="POST",
        headers={"Content-Type": "application/x-protobuf"},
    )
    try:
        with urllib.request.urlopen(http, timeout=20) as answer:
            status, content = answer.status, answer.read()
    except urllib.error.HTTPError as e:
        sys.exit(f"the collector answered {e.code}: {e.read().decode(errors='replace')}")
    if status != 200:
        sys.exit(f"the collector answered {status}: {content!r}")
    response = profiles_service_pb2.ExportProfilesServiceResponse()
    try:
        response.ParseFromString(content)
    except Exception as e:  # noqa: BLE001 (any decode error is the failure)
        sys.exit(f"the answer is no ExportProfilesServiceResponse: {e}: {content!r}")
    if response.partial_success.rejected_profiles:
        sys.exit(f"the collector rejected {response.partial_success.rejected_profiles} "
                 f"profiles: {response.partial_success.error_message}")
    json.dump({"node": host_name, "process": PROCESS, "pid": PID, "bytes": len(body),
               "types": expected, "threads": threads}, sys.stdout, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
