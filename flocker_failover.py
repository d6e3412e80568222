#!/bin/sh
""":"
# sh reads these lines only: run as a program, the code compiled once (_cached_main)
exec python3 -S -c 'import sys; f = open(sys.argv[1], "rb"); s = f.read(); f.close(); exec(s[s.index(b"\ndef _cached_main("):s.index(b"\n# end of _cached_main")]); del s; _cached_main()' "$0" "$@"
"
flocker-failover: high availability for one user system on exactly two hosts.

The master runs the user system on a ZFS dataset and replicates it to the
slave; when the master fails the slave takes over with the newest replica.

This file reads top to bottom in layers that only call downward:

  1. Constants, exit codes, errors, records
  2. Configuration                          (parse and validate everything up front)
  3. The state store                        (sqlite)
  4. The wire protocol                      (heartbeats, the witness's datagrams)
  5. Adapters: ZFS, ssh, commands, addresses
  6. The decision core (pure functions)     (replication planning, roles,
                                             the witness's lease, divergence)
  7. Actions                                (replication, promotion, demotion,
                                             keeping and resolving divergence)
  8. Status reports                         (status, check, metrics)
  9. The daemon                             (heartbeats, jobs, control socket;
                                             the witness's server)
  10. The command line

Standard library only; Python 3.8 or newer.
"""

from __future__ import annotations    # (never evaluated: see TYPE_CHECKING below)

import argparse
import atexit
import collections
import configparser
import contextlib
import errno
import faulthandler
import fcntl
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import operator
import os
import queue
import re
import selectors
import shlex
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time

# The annotations are for readers and type checkers: never evaluated (the
# __future__ import above), so typing is never imported, which would cost
# every start of the program 7 of its 60 ms (the ssh gate's, cron's).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Sequence, Set, Tuple

# ===========================================================================
# 1. Constants, exit codes, errors, records
# ===========================================================================

VERSION = "0.1.0"
PROG = "flocker-failover"
DEFAULT_CONFIG = "/etc/flocker/flocker.conf"

EXIT_OK = 0
EXIT_FAILURE = 1      # an operation failed (details in the message)
EXIT_USAGE = 2        # bad command line (argparse uses 2 as well)
EXIT_CONFIG = 3       # the configuration file is invalid
EXIT_STATE = 4        # the state file cannot be used
EXIT_ZFS = 5          # a zfs command failed or ZFS is unusable
EXIT_BUSY = 6         # another process holds the state lock
EXIT_SSH = 7          # the peer cannot be reached or refused us over ssh
EXIT_REPLICATION = 8  # a replication cycle was refused or failed
EXIT_REFUSED = 9      # the ssh gate refused a request of the peer

ROLE_MASTER = "master"
ROLE_SLAVE = "slave"
ROLES = (ROLE_MASTER, ROLE_SLAVE)

log = logging.getLogger(PROG)

# The wall clock, read only for display and for timestamps stored for
# people (never for liveness, replay protection or any decision: those use
# time.monotonic()).  One name, so that tests can swap in a stepped clock.
wall_clock = time.time


class FlockerError(Exception):
    """Every error the program reports.  The message says what is wrong and
    what to do about it; the exit code tells scripts which kind it was."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(FlockerError):
    exit_code = EXIT_CONFIG


class StateError(FlockerError):
    exit_code = EXIT_STATE


class CorruptState(StateError):
    """The state file is not a usable flocker-failover database."""


class LockBusy(StateError):
    exit_code = EXIT_BUSY


class ZfsError(FlockerError):
    exit_code = EXIT_ZFS


class ActionError(FlockerError):
    """A step of a promotion or demotion failed; the intent stays open and
    the next attempt (or the daemon's restart) finishes it."""


class SshError(FlockerError):
    """ssh to the peer failed (unreachable, host key, authentication)."""
    exit_code = EXIT_SSH


class ReplicationError(FlockerError):
    """A replication cycle was refused (unsafe) or its transfer failed."""
    exit_code = EXIT_REPLICATION


class DivergenceError(ReplicationError):
    """Replication found history on the slave that the master lacks: the
    two have diverged (see resolve_divergence)."""


# -- records ----------------------------------------------------------------
#
# The file's data classes are records: @record is what
# dataclasses.dataclass(frozen=True) would be, record(mutable=True) what
# dataclasses.dataclass() would be, with the same fields (the class's
# annotations, in order), __init__, __repr__ and __eq__ (a frozen one is
# hashable and refuses assignment), replace() and asdict().  Not dataclasses
# because of what they cost each process: they write every class's methods
# as source text and compile it at each start, and a start is what the ssh
# gate pays for every connection and cron for every 'check' (26 classes:
# importing this file took 86 ms with them, 64 ms without, on the 2-core
# test machine).  Here every record shares the same few functions, which
# read the class's fields.  tests/test_records.py holds each class to what
# dataclasses makes of it.

_NO_DEFAULT = object()


class Field:
    """A record field's options: field(default=..., default_factory=...,
    repr=False), as dataclasses.field's."""

    __slots__ = ("name", "default", "default_factory", "repr")

    def __init__(self, default=_NO_DEFAULT, default_factory=None, repr=True):
        self.name = ""
        self.default, self.default_factory, self.repr = default, default_factory, repr


def field(*, default=_NO_DEFAULT, default_factory=None, repr=True):  # noqa: A002
    return Field(default, default_factory, repr)


class FrozenRecordError(AttributeError):
    """An assignment to a frozen record (dataclasses: FrozenInstanceError)."""


def _record_init(self, *args, **kwargs) -> None:
    fields = type(self)._record_fields
    if len(args) > len(fields):
        raise TypeError("%s() takes %d arguments but %d were given"
                        % (type(self).__name__, len(fields), len(args)))
    unknown = kwargs.keys() - type(self)._record_names
    if unknown:
        raise TypeError("%s() got an unexpected keyword argument %r"
                        % (type(self).__name__, sorted(unknown)[0]))
    for i, f in enumerate(fields):
        if i < len(args):
            if f.name in kwargs:
                raise TypeError("%s() got multiple values for argument %r"
                                % (type(self).__name__, f.name))
            value = args[i]
        elif f.name in kwargs:
            value = kwargs[f.name]
        elif f.default_factory is not None:
            value = f.default_factory()
        elif f.default is not _NO_DEFAULT:
            value = f.default
        else:
            raise TypeError("%s() missing required argument %r"
                            % (type(self).__name__, f.name))
        object.__setattr__(self, f.name, value)


def _record_values(self) -> tuple:
    return tuple(getattr(self, f.name) for f in type(self)._record_fields)


def _record_repr(self) -> str:
    return "%s(%s)" % (type(self).__qualname__, ", ".join(
        "%s=%r" % (f.name, getattr(self, f.name)) for f in type(self)._record_fields
        if f.repr))


def _record_eq(self, other):
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _record_values(self) == _record_values(other)


def _record_hash(self) -> int:
    return hash(_record_values(self))


def _record_frozen(self, name, value=None):
    raise FrozenRecordError("cannot assign to field %r" % name)


def record(cls=None, *, mutable: bool = False):
    """The class as a record (see above): @record, or @record(mutable=True)."""
    if cls is None:
        return lambda c: record(c, mutable=mutable)
    own = sorted({"__init__", "__repr__", "__eq__", "__hash__", "__setattr__",
                  "__delattr__"} & set(cls.__dict__))
    if own:          # (dataclasses would keep some of them, silently)
        raise TypeError("%s defines %s, which a record makes itself"
                        % (cls.__name__, ", ".join(own)))
    fields = []
    for name in cls.__dict__.get("__annotations__", {}):
        value = cls.__dict__.get(name, _NO_DEFAULT)
        f = value if isinstance(value, Field) else Field(default=value)
        f.name = name
        if f.default is not _NO_DEFAULT and type(f.default).__hash__ is None:
            # one object every instance would share (a list, a dict, a mutable record)
            raise ValueError("mutable default %s for field %r is not allowed: use "
                             "default_factory" % (type(f.default), name))
        if f.default is _NO_DEFAULT and f.default_factory is None:
            if fields and (fields[-1].default is not _NO_DEFAULT
                           or fields[-1].default_factory is not None):
                raise TypeError("%s: field %r without a default follows one with a "
                                "default" % (cls.__name__, name))
            if name in cls.__dict__:
                delattr(cls, name)
        elif f.default is not _NO_DEFAULT:
            setattr(cls, name, f.default)
        else:
            delattr(cls, name)
        fields.append(f)
    cls._record_fields = tuple(fields)
    cls._record_names = frozenset(f.name for f in fields)
    cls.__init__ = _record_init
    cls.__repr__ = _record_repr
    cls.__eq__ = _record_eq
    if mutable:
        cls.__hash__ = None
    else:
        cls.__hash__ = _record_hash
        cls.__setattr__ = _record_frozen
        cls.__delattr__ = _record_frozen
    return cls


def replace(obj, **changes):
    """A copy of the record obj with the fields named in changes changed
    (a name that is not a field: TypeError, from __init__)."""
    values = {f.name: getattr(obj, f.name) for f in type(obj)._record_fields}
    values.update(changes)
    return type(obj)(**values)


def asdict(obj):
    """The record obj as a dict, records within it (also in lists, tuples
    and dicts) as dicts too, as dataclasses.asdict."""
    if hasattr(type(obj), "_record_fields"):
        return {f.name: asdict(getattr(obj, f.name)) for f in type(obj)._record_fields}
    if isinstance(obj, (list, tuple)):
        return type(obj)(asdict(v) for v in obj)
    if isinstance(obj, dict):
        return {asdict(k): asdict(v) for k, v in obj.items()}
    return obj


# ===========================================================================
# 2. Configuration
# ===========================================================================
#
# One INI file, identical on both hosts.  Every option is declared once, in
# the tables CLUSTER_OPTIONS, SERVICE_OPTIONS and NODE_OPTIONS below, with
# its parser, default and unit; flocker.conf.example documents the same
# tables (a test checks they agree).

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
# A ZFS dataset component: letters, digits and _ - . : (as zfs allows).
_DS_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
_SSH_TARGET_RE = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]*@)?[A-Za-z0-9_.:-]+$")
_IFACE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


class _Invalid(Exception):
    """Raised by an option parser: 'expected ...' text; the caller adds
    file, section, option and the value found."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _p_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise _Invalid("a name of 1 to 32 letters, digits, '_', '.' or '-', "
                       "starting with a letter or digit")
    return value


def _p_abspath(value: str) -> str:
    if not value.startswith("/") or "\x00" in value:
        raise _Invalid("an absolute path (starting with /)")
    return os.path.normpath(value)


def _p_port(value: str) -> int:
    try:
        port = int(value, 10)
    except ValueError:
        raise _Invalid("a UDP port number from 1 to 65535") from None
    if not 1 <= port <= 65535:
        raise _Invalid("a UDP port number from 1 to 65535")
    return port


def _p_tcp_port(value: str) -> int:
    try:
        return _p_port(value)
    except _Invalid:
        raise _Invalid("a TCP port number from 1 to 65535") from None


def _p_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise _Invalid("a number of seconds greater than 0 (e.g. 1.5)") from None
    if not (seconds > 0 and seconds < 10 ** 7):  # also rejects nan and inf
        raise _Invalid("a number of seconds greater than 0 (e.g. 1.5)")
    return seconds


def _non_negative(value: str, expected: str, below: float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _Invalid(expected) from None
    if not (number >= 0 and number < below):    # also rejects nan and inf
        raise _Invalid(expected)
    return number


def _p_seconds_or_0(value: str) -> float:
    return _non_negative(value, "a number of seconds, 0 or more (e.g. 5)", 10 ** 7)


def _whole_number(value: str, least: int) -> int:
    try:
        count = int(value, 10)
    except ValueError:
        count = least - 1
    if count < least:
        raise _Invalid("a whole number of at least %d" % least)
    return count


def _p_count(value: str) -> int:
    return _whole_number(value, 1)


def _p_event_rows(value: str) -> int:
    return _whole_number(value, 100)


def _p_days(value: str) -> float:
    return _non_negative(value, "a number of days, 0 or more (0: no age limit)", 10 ** 6)


_RATE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _p_rate(value: str) -> int:
    """Bytes per second: 0 (no limit), or a whole number with K, M or G
    (powers of 1024), e.g. 20M."""
    expected = "bytes per second: 0 (no limit) or a whole number with K, M or G, e.g. 20M"
    m = re.match(r"^(\d+)([KMG]?)(?:i?B)?(?:/s)?$", value.strip(), re.I)
    if not m:
        raise _Invalid(expected)
    rate = int(m.group(1)) * _RATE_UNITS[m.group(2).upper()]
    if 0 < rate < 4096 or rate > 1 << 40:
        raise _Invalid(expected + " (at least 4K, at most 1024G)")
    return rate


_BOOLS = {"yes": True, "true": True, "on": True, "1": True,
          "no": False, "false": False, "off": False, "0": False}


def _p_bool(value: str) -> bool:
    try:
        return _BOOLS[value.lower()]
    except KeyError:
        raise _Invalid("yes or no") from None


def _p_addresses(value: str) -> Tuple[str, ...]:
    expected = ("one or more IP addresses separated by commas "
                "(e.g. 192.0.2.1, 198.51.100.1); host names are not accepted")
    items = [v.strip() for v in value.split(",")]
    if not items or any(not v for v in items):
        raise _Invalid(expected)
    out = []
    for item in items:
        try:
            addr = ipaddress.ip_address(item)
        except ValueError:
            raise _Invalid(expected) from None
        if addr.is_unspecified or addr.is_multicast:
            raise _Invalid("unicast IP addresses (not %s)" % item)
        out.append(str(addr))
    return tuple(out)


def _p_dataset(value: str) -> str:
    expected = ("a ZFS dataset below a pool, such as tank/shop "
                "(letters, digits, '_', '-', '.', ':' separated by '/')")
    parts = value.split("/")
    if len(value) > 200 or len(parts) < 2:
        raise _Invalid(expected)
    if any(not _DS_COMPONENT_RE.match(p) for p in parts):
        raise _Invalid(expected)
    if not parts[0][0].isalpha():
        raise _Invalid(expected)
    return value


def _p_ssh_target(value: str) -> str:
    if not _SSH_TARGET_RE.match(value) or value.startswith("-"):
        raise _Invalid("an ssh destination such as root@192.0.2.2 or "
                       "backup.example.net")
    return value


def _p_command(value: str) -> Tuple[str, ...]:
    try:
        argv = shlex.split(value)
    except ValueError as e:
        raise _Invalid("a command line in shell quoting (%s)" % e) from None
    if not argv:
        raise _Invalid("a command line")
    return tuple(argv)


_SEND_FLAGS = ("-c", "-L", "-e", "-w")


def _p_send_flags(value: str) -> Tuple[str, ...]:
    flags = value.split()
    if any(f not in _SEND_FLAGS for f in flags) or len(set(flags)) != len(flags):
        raise _Invalid("zfs send flags among %s, separated by spaces"
                       % " ".join(_SEND_FLAGS))
    return tuple(flags)


@record
class ServiceAddress:
    address: str       # e.g. 192.0.2.100
    prefix: int        # e.g. 24
    device: str        # e.g. eth0

    def __str__(self) -> str:
        return "%s/%d dev %s" % (self.address, self.prefix, self.device)


def _p_priority(value: str) -> int:
    try:
        n = int(value, 10)
    except ValueError:
        raise _Invalid("a whole number from 0 (off) to 99") from None
    if not 0 <= n <= 99:
        raise _Invalid("a whole number from 0 (off) to 99")
    return n


_POLICIES = ("most-changes", "newest-master", "oldest-master", "zero-changes-only", "manual")


def _p_policy(value: str) -> str:
    expected = "one of %s or prefer-node:NAME" % ", ".join(_POLICIES)
    if value in _POLICIES:
        return value
    if value.startswith("prefer-node:") and _NAME_RE.match(value[len("prefer-node:"):]):
        return value
    raise _Invalid(expected)


def _p_arbitrator(value: str) -> Tuple[str, int]:
    expected = "HOST:PORT (IPv6: [ADDRESS]:PORT), e.g. 192.0.2.254:22"
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", value) or re.match(r"^([^:\s]+):(\d+)$", value)
    if not m:
        raise _Invalid(expected)
    host, port = m.group(1), int(m.group(2))
    if not 1 <= port <= 65535:
        raise _Invalid(expected)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise _Invalid(expected + " (an IP address, not a name: no DNS lookup "
                       "may stand between a node and its decision)") from None
    return (host, port)


def _p_witness(value: str) -> Tuple[str, int]:
    try:
        return _p_arbitrator(value)
    except _Invalid as e:
        raise _Invalid(e.expected.replace("192.0.2.254:22", "192.0.2.254:7789")) from None


def _p_service_address(value: str) -> ServiceAddress:
    expected = "ADDRESS/PREFIX dev INTERFACE, e.g. 192.0.2.100/24 dev eth0"
    words = value.split()
    if len(words) != 3 or words[1] != "dev" or not _IFACE_RE.match(words[2]):
        raise _Invalid(expected)
    try:
        iface = ipaddress.ip_interface(words[0])
    except ValueError:
        raise _Invalid(expected) from None
    if "/" not in words[0]:
        raise _Invalid(expected)
    return ServiceAddress(str(iface.ip), iface.network.prefixlen, words[2])


@record
class Option:
    name: str
    parse: object          # callable str -> value
    default: Optional[str]  # None: required; "" : optional, empty means unset
    unit: str
    doc: str


CLUSTER_OPTIONS = (
    Option("name", _p_name, None, "name",
           "Cluster name; both nodes must use the same one."),
    Option("secret_file", _p_abspath, "/etc/flocker/secret", "path",
           "File with the shared secret (>= 32 random bytes, mode 0600)."),
    Option("secret_file_previous", _p_abspath, "", "path",
           "During a key change: a second accepted key (empty: none)."),
    Option("heartbeat_port", _p_port, "7788", "UDP port",
           "Port the heartbeats are sent to and received on."),
    Option("heartbeat_interval", _p_seconds, "1.0", "seconds",
           "Time between two heartbeats."),
    Option("dead_time", _p_seconds, "5.0", "seconds",
           "Peer is dead when no valid heartbeat came for this long."),
    Option("startup_wait", _p_seconds, "10.0", "seconds",
           "At start, listen this long for the peer before deciding a role."),
    Option("wait_for_peer", _p_bool, "yes", "yes/no",
           "A starting slave never promotes before it has heard its peer."),
    Option("state_db", _p_abspath, "/var/lib/flocker/state.db", "path",
           "sqlite file holding role, epoch and history."),
    Option("event_log_keep_rows", _p_event_rows, "100000", "events",
           "The event log keeps at most this many events; the daemon trims "
           "the oldest at start-up and hourly, and records each trim."),
    Option("event_log_keep_days", _p_days, "365", "days",
           "The daemon also trims events older than this (0: no age limit)."),
    Option("replication_interval", _p_seconds, "10.0", "seconds",
           "Time between two replication cycles on the master."),
    Option("snapshot_keep", _p_count, "10", "snapshots",
           "Replication snapshots kept on each side; the newest common one "
           "(held) is kept besides. Also the cap while the peer is away, so a "
           "catch-up carries at most this many."),
    Option("recursive", _p_bool, "no", "yes/no",
           "Replicate child datasets too."),
    Option("replication_bandwidth", _p_rate, "0", "bytes per second",
           "Upper limit of the replication stream, so that replication over a "
           "shared link does not starve the user system: a number with K, M or "
           "G (powers of 1024), e.g. 20M; smooth, never more than one second's "
           "worth at once (0: no limit)."),
    Option("transfer_stall_timeout", _p_seconds, "60.0", "seconds",
           "Kill a transfer that moved no data for this long (after the last "
           "byte left, the peer gets this plus ssh timeouts plus 60 s to finish)."),
    Option("ssh_identity", _p_abspath, "/etc/flocker/id_ed25519", "path",
           "Private key used to ssh to the peer."),
    Option("ssh_known_hosts", _p_abspath, "/etc/flocker/known_hosts", "path",
           "known_hosts file holding the peer's host key."),
    Option("ssh_connect_timeout", _p_seconds, "10.0", "seconds",
           "ssh ConnectTimeout."),
    Option("ssh_alive_interval", _p_seconds, "5.0", "seconds",
           "ssh ServerAliveInterval; a connection that misses 3 answers is dead."),
    Option("ssh_control_persist", _p_seconds, "300", "seconds",
           "Keep the ssh connection to the peer open this long after last use "
           "(ControlPersist), so a cycle costs no new ssh handshake."),
    Option("send_flags", _p_send_flags, "", "zfs send flags",
           "Extra zfs send flags among -c -L -e -w (OpenZFS); each is used "
           "only when both hosts' zfs support it, else left out with a warning."),
    Option("realtime_priority", _p_priority, "10", "SCHED_RR priority",
           "The daemon's event loop (heartbeats, liveness) runs with this "
           "real-time priority (1-99), so that a busy host cannot delay its "
           "heartbeats into a false failover; 0 keeps the normal scheduler."),
    Option("divergence_policy", _p_policy, "most-changes", "policy",
           "Which side's data continues after a split brain: most-changes, "
           "newest-master, oldest-master, prefer-node:NAME, zero-changes-only or "
           "manual. Both nodes must use the same."),
    Option("metrics_file", _p_abspath, "", "path",
           "The daemon writes Prometheus text-format metrics here every 5 s "
           "(atomically), for node_exporter's textfile collector (empty: none)."),
    Option("arbitrator", _p_arbitrator, "", "HOST:PORT",
           "A third address both nodes should reach (a router, a switch, a "
           "third host): reachable when a TCP connection to it is accepted or "
           "refused. A slave promotes only while it reaches it; a master that "
           "reaches neither it nor its peer steps down (empty: none)."),
    Option("arbitrator_command", _p_command, "", "command",
           "Instead of arbitrator: a command that exits 0 while the "
           "arbitrator is reachable (e.g. ping -c 1 -W 1 ADDRESS)."),
    Option("arbitrator_timeout", _p_seconds, "", "seconds",
           "Longest time one arbitrator check may take (at most twice "
           "heartbeat_interval); it runs every heartbeat_interval (empty: "
           "1 s or twice heartbeat_interval, whichever is shorter)."),
    Option("witness", _p_witness, "", "HOST:PORT",
           "The UDP address of a witness ('flocker_failover.py witness' on a "
           "third machine): it lends its lease to one node at a time. A slave "
           "promotes only holding it; a master that cannot renew it while its "
           "peer is silent steps down before it runs out (empty: none)."),
    Option("witness_lease", _p_seconds, "", "seconds",
           "Length of the witness's lease, renewed every heartbeat_interval; "
           "at least 4 heartbeat_interval and at least dead_time. After the "
           "master dies the slave gets the lease after this plus the witness's "
           "margin (max(1 s, a tenth of it)) (empty: 10 s, or 4 heartbeat_interval "
           "or dead_time when one of those is longer)."),
    Option("witness_timeout", _p_seconds, "", "seconds",
           "Longest wait for the witness's answer to one request (at most "
           "heartbeat_interval) (empty: 0.5 s or heartbeat_interval, whichever "
           "is shorter)."),
)

SERVICE_OPTIONS = (
    Option("start_command", _p_command, "", "command",
           "Starts the user system (run when this node becomes master)."),
    Option("stop_command", _p_command, "", "command",
           "Stops the user system (run when this node stops being master)."),
    Option("check_command", _p_command, "", "command",
           "Exits 0 while the user system is healthy."),
    Option("notify_command", _p_command, "", "command",
           "Run after every role change, with FLOCKER_OLD_ROLE, FLOCKER_NEW_ROLE, "
           "FLOCKER_EPOCH and FLOCKER_REASON in its environment."),
    Option("check_interval", _p_seconds, "10.0", "seconds",
           "Time between two runs of check_command by the daemon."),
    Option("check_failures", _p_count, "3", "checks",
           "Consecutive failed checks after which the master hands the service "
           "over to the slave (only when the slave is alive and up to date)."),
    Option("hold_down", _p_seconds, "300", "seconds",
           "After a role change, a failing check does not move the role again "
           "for this long (no ping-pong of a flapping service)."),
    Option("fence_command", _p_command, "", "command",
           "Run by a slave before it takes over from a silent peer (e.g. power "
           "the peer off through its BMC); the takeover waits until it exits 0. "
           "FLOCKER_PEER names the peer."),
    Option("snapshot_command", _p_command, "", "command",
           "Run on the master right before each replication snapshot, to make "
           "the user system's data consistent (a database CHECKPOINT or lock, "
           "fsfreeze -f). When it fails, no snapshot is taken that cycle."),
    Option("snapshot_done_command", _p_command, "", "command",
           "Run right after the snapshot (also when it or snapshot_command "
           "failed: FLOCKER_SNAPSHOT_RESULT says which), to let go of what "
           "snapshot_command held (fsfreeze -u, an unlock)."),
    Option("snapshot_timeout", _p_seconds, "30.0", "seconds",
           "Longest snapshot_command or snapshot_done_command may run; then "
           "it is killed (and for the first, no snapshot is taken)."),
    Option("key_command", _p_command, "", "command",
           "prints the key of the encrypted dataset on standard output; at promotion, "
           "when its key is not loaded, it goes to 'zfs load-key -L prompt'"),
    Option("command_timeout", _p_seconds, "60.0", "seconds",
           "Longest time a start, stop, check or notify command may run."),
    Option("service_address", _p_service_address, "", "address",
           "Address the master owns: ADDRESS/PREFIX dev INTERFACE."),
    Option("announce_count", _p_count, "5", "packets",
           "Gratuitous ARP packets (IPv6: unsolicited neighbour advertisements) "
           "in each announcement of the service address."),
    Option("announce_interval", _p_seconds, "0.05", "seconds",
           "Time between two packets of an announcement."),
    Option("announce_again", _p_seconds_or_0, "5", "seconds",
           "A second announcement this long after the first, for neighbours "
           "that missed it (a switch port still coming up); 0: none."),
)

NODE_OPTIONS = (
    Option("address", _p_addresses, None, "IP addresses",
           "This node's heartbeat address(es), one per link, comma-separated."),
    Option("ssh", _p_ssh_target, "", "user@host",
           "How the peer reaches this node by ssh (default: root@first address)."),
    Option("ssh_port", _p_tcp_port, "22", "TCP port",
           "sshd port on this node."),
    Option("dataset", _p_dataset, None, "dataset",
           "The replicated ZFS dataset on this node (names may differ per node)."),
    Option("state_db", _p_abspath, "", "path",
           "Overrides [cluster] state_db for this node."),
)


def _derive_timeouts(c: Dict[str, object]) -> None:
    """Timeouts left unset follow the heartbeat timings they are bound to,
    so that a user who changes heartbeat_interval or dead_time need not
    learn their rules (a value set by hand is checked against them)."""
    interval, dead = c["heartbeat_interval"], c["dead_time"]
    if c["arbitrator_timeout"] is None:
        c["arbitrator_timeout"] = min(1.0, 2 * interval)
    if c["witness_lease"] is None:
        c["witness_lease"] = max(10.0, 4 * interval, dead)
    if c["witness_timeout"] is None:
        c["witness_timeout"] = min(0.5, interval)


def _defaults(options: Sequence[Option]) -> Dict[str, object]:
    """Each option's default as its parser reads it (None: required, or
    unset), so that the tables above are the one place defaults are
    written: the configuration classes below take theirs from here."""
    return {o.name: o.parse(o.default) if o.default else None for o in options}


CLUSTER_DEFAULTS = _defaults(CLUSTER_OPTIONS)
_derive_timeouts(CLUSTER_DEFAULTS)
SERVICE_DEFAULTS = _defaults(SERVICE_OPTIONS)


@record
class NodeConfig:
    name: str
    addresses: Tuple[str, ...]
    ssh: str
    ssh_port: int
    dataset: str
    state_db: str


@record
class ServiceConfig:
    start_command: Optional[Tuple[str, ...]]
    stop_command: Optional[Tuple[str, ...]]
    check_command: Optional[Tuple[str, ...]]
    notify_command: Optional[Tuple[str, ...]]
    check_interval: float
    command_timeout: float
    service_address: Optional[ServiceAddress]
    check_failures: int = SERVICE_DEFAULTS["check_failures"]
    hold_down: float = SERVICE_DEFAULTS["hold_down"]
    fence_command: Optional[Tuple[str, ...]] = None
    announce_count: int = SERVICE_DEFAULTS["announce_count"]
    announce_interval: float = SERVICE_DEFAULTS["announce_interval"]
    announce_again: float = SERVICE_DEFAULTS["announce_again"]
    snapshot_command: Optional[Tuple[str, ...]] = None
    snapshot_done_command: Optional[Tuple[str, ...]] = None
    snapshot_timeout: float = SERVICE_DEFAULTS["snapshot_timeout"]
    key_command: Optional[Tuple[str, ...]] = None


@record
class Config:
    """The whole configuration, validated (parse_config).  A field per
    option of [cluster], its default the table's (CLUSTER_DEFAULTS, for
    a Config built by hand, as tests do)."""
    path: str
    name: str
    secret_file: str
    secret: bytes = field(repr=False)
    heartbeat_port: int = CLUSTER_DEFAULTS["heartbeat_port"]
    heartbeat_interval: float = CLUSTER_DEFAULTS["heartbeat_interval"]
    dead_time: float = CLUSTER_DEFAULTS["dead_time"]
    startup_wait: float = CLUSTER_DEFAULTS["startup_wait"]
    wait_for_peer: bool = CLUSTER_DEFAULTS["wait_for_peer"]
    # the cluster's default; each node's own is NodeConfig.state_db
    state_db: str = CLUSTER_DEFAULTS["state_db"]
    event_log_keep_rows: int = CLUSTER_DEFAULTS["event_log_keep_rows"]
    event_log_keep_days: float = CLUSTER_DEFAULTS["event_log_keep_days"]
    replication_interval: float = CLUSTER_DEFAULTS["replication_interval"]
    snapshot_keep: int = CLUSTER_DEFAULTS["snapshot_keep"]
    recursive: bool = CLUSTER_DEFAULTS["recursive"]
    transfer_stall_timeout: float = CLUSTER_DEFAULTS["transfer_stall_timeout"]
    replication_bandwidth: int = CLUSTER_DEFAULTS["replication_bandwidth"]
    ssh_identity: str = CLUSTER_DEFAULTS["ssh_identity"]
    ssh_known_hosts: str = CLUSTER_DEFAULTS["ssh_known_hosts"]
    ssh_connect_timeout: float = CLUSTER_DEFAULTS["ssh_connect_timeout"]
    ssh_alive_interval: float = CLUSTER_DEFAULTS["ssh_alive_interval"]
    ssh_control_persist: float = CLUSTER_DEFAULTS["ssh_control_persist"]
    send_flags: Tuple[str, ...] = ()     # (empty: none)
    realtime_priority: int = CLUSTER_DEFAULTS["realtime_priority"]
    divergence_policy: str = CLUSTER_DEFAULTS["divergence_policy"]
    metrics_file: Optional[str] = CLUSTER_DEFAULTS["metrics_file"]
    arbitrator: Optional[Tuple[str, int]] = CLUSTER_DEFAULTS["arbitrator"]
    arbitrator_command: Optional[Tuple[str, ...]] = CLUSTER_DEFAULTS["arbitrator_command"]
    arbitrator_timeout: float = CLUSTER_DEFAULTS["arbitrator_timeout"]
    witness: Optional[Tuple[str, int]] = CLUSTER_DEFAULTS["witness"]
    witness_lease: float = CLUSTER_DEFAULTS["witness_lease"]
    witness_timeout: float = CLUSTER_DEFAULTS["witness_timeout"]
    service: Optional[ServiceConfig] = None
    nodes: Tuple[NodeConfig, ...] = ()
    local_name: str = ""   # which of the two nodes this host is
    secret_file_previous: Optional[str] = CLUSTER_DEFAULTS["secret_file_previous"]
    secret_previous: Optional[bytes] = field(default=None, repr=False)

    @property
    def local(self) -> NodeConfig:
        return self.node(self.local_name)

    @property
    def peer(self) -> NodeConfig:
        return [n for n in self.nodes if n.name != self.local_name][0]

    def node(self, name: str) -> NodeConfig:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def key_id(self) -> str:
        return key_id(self.secret)

    @property
    def local_index(self) -> int:
        """This node's node_index (which parity of epochs it owns)."""
        return node_index([n.name for n in self.nodes], self.local_name)


def node_index(node_names: Sequence[str], name: str) -> int:
    """0 for the first node by name, 1 for the second: the same on both
    hosts, from the configuration alone (each owns one parity of epochs,
    see section 6)."""
    return sorted(node_names).index(name)


def key_id(secret: bytes) -> str:
    """A short public fingerprint of a secret: compare it across hosts
    without showing the secret."""
    return hashlib.sha256(b"flocker-failover key id\x00" + secret).hexdigest()[:8]


def _parse_section(path, section, options, raw) -> Dict[str, object]:
    """Parse one section against its option table; unknown options are
    errors.  Returns {option name: parsed value or None when unset}."""
    known = {o.name: o for o in options}
    for key in raw:
        if key not in known:
            raise ConfigError(
                "%s: [%s] %s: unknown option; the options of this section are: %s"
                % (path, section, key, ", ".join(sorted(known))))
    values = {}
    for opt in options:
        text = raw.get(opt.name)
        if text is None:
            if opt.default is None:
                raise ConfigError("%s: [%s] %s: missing; expected %s"
                                  % (path, section, opt.name, _expected_of(opt)))
            text = opt.default
        text = text.strip()
        if text == "" and opt.default == "":
            values[opt.name] = None
            continue
        try:
            values[opt.name] = opt.parse(text)
        except _Invalid as e:
            raise ConfigError("%s: [%s] %s: expected %s, found %r"
                              % (path, section, opt.name, e.expected, text)) from None
    return values


def _expected_of(opt: Option) -> str:
    try:
        opt.parse("")
    except _Invalid as e:
        return e.expected
    return opt.unit  # pragma: no cover - every required option rejects ""


def read_secret(path: str, section: str, option: str, config_path: str) -> bytes:
    """Read and check the shared secret file."""
    where = "%s: [%s] %s" % (config_path, section, option)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise ConfigError(
            "%s: cannot read the secret file %s: %s; create it on one node with "
            "'flocker_failover.py genkey --output %s' and copy it to the other"
            % (where, path, e.strerror, path)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("%s: %s is not a regular file" % (where, path))
        if st.st_mode & 0o077:
            raise ConfigError(
                "%s: the secret file %s is readable by group or others (mode %04o); "
                "run: chmod 600 %s" % (where, path, stat.S_IMODE(st.st_mode), path))
        if st.st_uid != os.geteuid():
            raise ConfigError(
                "%s: the secret file %s belongs to uid %d, not to the user running "
                "flocker-failover (uid %d); run: chown %d %s"
                % (where, path, st.st_uid, os.geteuid(), os.geteuid(), path))
        data = os.read(fd, 4097)
    finally:
        os.close(fd)
    secret = data.strip()
    if len(data) > 4096:
        raise ConfigError("%s: the secret file %s is larger than 4096 bytes; "
                          "it should hold one key made by genkey" % (where, path))
    if len(secret) < 32:
        raise ConfigError(
            "%s: the secret file %s holds %d bytes; at least 32 random bytes are "
            "needed; make one with 'flocker_failover.py genkey --output FILE'"
            % (where, path, len(secret)))
    if len(set(secret)) < 12:
        raise ConfigError(
            "%s: the secret in %s does not look random (only %d different byte "
            "values); make one with 'flocker_failover.py genkey --output FILE'"
            % (where, path, len(set(secret))))
    return secret


def load_config(path: str, node: Optional[str] = None,
                identify: bool = True) -> Config:
    """Read, parse and validate the whole configuration; find which node
    this host is (unless identify is False).  Raises ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(
            "cannot read the configuration file %s: %s; copy flocker.conf.example "
            "there and edit it, or pass --config PATH" % (path, e.strerror)) from None
    except UnicodeDecodeError as e:
        raise ConfigError("%s: not UTF-8 text (%s)" % (path, e)) from None
    cfg = parse_config(text, path)
    if identify:
        cfg = replace(cfg, local_name=identify_node(cfg, node))
    elif node is not None:
        cfg = replace(cfg, local_name=identify_node(cfg, node))
    return cfg


WITNESS_MAX_LEASE = 3600.0   # seconds: no node asks for a longer lease


def witness_timing_problem(interval: float, dead_time: float, lease: float,
                           timeout: float) -> Optional[str]:
    """Why these witness timings are unsafe (None: they are safe).

    The master renews every interval and, while its peer is silent, steps
    down once half its lease is gone (see witness_lead): so half a lease
    must hold two renewals; a stall shorter than dead_time * STALL_FRACTION
    goes unnoticed (the monotonic clock may not count a suspended VM), so
    half a lease must outlast it too; and an answer must come within one
    interval, or renewals would queue up."""
    if lease < 4 * interval:
        return ("witness_lease: expected at least 4 times heartbeat_interval (%g s): the "
                "master steps down when half its lease is gone, which must leave room "
                "for two renewals, found %g" % (4 * interval, lease))
    if lease < dead_time:
        return ("witness_lease: expected at least dead_time (%g s): half a lease must "
                "outlast a stall of the daemon too short to be noticed (half of "
                "dead_time), found %g" % (dead_time, lease))
    if lease > WITNESS_MAX_LEASE:
        return ("witness_lease: expected at most %g s (a dead master's lease blocks "
                "the failover this long), found %g" % (WITNESS_MAX_LEASE, lease))
    if timeout > interval:
        return ("witness_timeout: expected at most heartbeat_interval (%g s): one "
                "request is sent every interval, found %g" % (interval, timeout))
    return None


def parse_config(text: str, path: str = "<config>") -> Config:
    """Parse and validate a whole configuration file (its text; path
    names it in messages, and the secret files are read).  Every problem
    is a ConfigError naming the file, the section and the option, and
    what was expected; the first one found is reported."""
    parser = _read_ini(text, path)
    node_sections = _node_sections(parser, path)
    c = _parse_section(path, "cluster", CLUSTER_OPTIONS, dict(parser["cluster"]))
    s = _parse_section(path, "service", SERVICE_OPTIONS,
                       dict(parser["service"]) if parser.has_section("service") else {})
    _check_timings(path, c, s)
    nodes = [_parse_node(path, section, dict(parser[section]), c["state_db"])
             for section in node_sections]
    _check_pair(path, nodes, c["divergence_policy"])
    secret, previous = _read_secrets(path, c)
    # one field per option, by name: [cluster] into Config, [service]
    # into ServiceConfig
    c["send_flags"] = c["send_flags"] or ()
    return Config(path=path, secret=secret, secret_previous=previous,
                  service=ServiceConfig(**s), nodes=tuple(nodes), **c)


def _read_ini(text: str, path: str) -> configparser.ConfigParser:
    """The INI text read by configparser, its errors said as ours."""
    # default_section is set to a name no file uses, so that a [DEFAULT]
    # section is rejected as unknown instead of silently applying everywhere.
    parser = configparser.ConfigParser(
        interpolation=None, strict=True, empty_lines_in_values=False,
        default_section="\x00unused")
    try:
        parser.read_string(text, source=path)
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError("%s: line %d: text before the first [section] header: %r"
                          % (path, e.lineno, e.line.strip())) from None
    except configparser.DuplicateSectionError as e:
        raise ConfigError("%s: line %s: section [%s] appears twice"
                          % (path, e.lineno, e.section)) from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError("%s: line %s: [%s] %s appears twice in the section"
                          % (path, e.lineno, e.section, e.option)) from None
    except configparser.ParsingError as e:
        lineno, line = e.errors[0]
        raise ConfigError("%s: line %d: cannot parse %s; expected 'option = value' "
                          "or a [section] header" % (path, lineno, line.strip()))
    except configparser.Error as e:  # pragma: no cover - other parser errors
        raise ConfigError("%s: %s" % (path, e)) from None

    return parser


def _node_sections(parser: configparser.ConfigParser, path: str) -> List[str]:
    """The two [node NAME] sections; any section that is not [cluster],
    [service] or one of those is an error, and so is a missing [cluster]."""
    node_sections = []
    for section in parser.sections():
        if section in ("cluster", "service"):
            continue
        words = section.split()
        if len(words) == 2 and words[0] == "node":
            node_sections.append(section)
            continue
        raise ConfigError(
            "%s: [%s]: unknown section; expected [cluster], [service] or "
            "[node NAME]" % (path, section))
    if not parser.has_section("cluster"):
        raise ConfigError("%s: [cluster]: missing section; it must at least set "
                          "name" % path)
    if len(node_sections) != 2:
        raise ConfigError(
            "%s: expected exactly two [node NAME] sections, found %d%s; "
            "flocker-failover runs on exactly two hosts"
            % (path, len(node_sections),
               (" (" + ", ".join("[%s]" % s for s in node_sections) + ")")
               if node_sections else ""))
    return node_sections


def _check_timings(path: str, c: Dict[str, object], s: Dict[str, object]) -> None:
    """What [cluster] and [service] require across options: dead_time
    against heartbeat_interval, start and stop commands in pairs, the
    arbitrator's and the witness's timings (the unset ones derived here),
    one arbitrator at most."""
    if c["dead_time"] < 2 * c["heartbeat_interval"]:
        raise ConfigError(
            "%s: [cluster] dead_time: expected at least twice heartbeat_interval "
            "(%g s), so that one lost heartbeat cannot cause a failover, found %g"
            % (path, c["heartbeat_interval"], c["dead_time"]))
    if (s["start_command"] is None) != (s["stop_command"] is None):
        have, missing = (("start_command", "stop_command")
                         if s["stop_command"] is None
                         else ("stop_command", "start_command"))
        raise ConfigError(
            "%s: [service] %s: missing; expected a command because %s is set "
            "(a master must be able to stop what it started)" % (path, missing, have))

    _derive_timeouts(c)
    if ((c["arbitrator"] is not None or c["arbitrator_command"] is not None)
            and c["arbitrator_timeout"] > 2 * c["heartbeat_interval"]):
        raise ConfigError(
            "%s: [cluster] arbitrator_timeout: expected at most twice heartbeat_interval "
            "(%g s): an isolated master must learn that the arbitrator is gone before "
            "the slave may promote, found %g" % (path, 2 * c["heartbeat_interval"],
                                                 c["arbitrator_timeout"]))
    if c["witness"] is not None:
        problem = witness_timing_problem(c["heartbeat_interval"], c["dead_time"],
                                         c["witness_lease"], c["witness_timeout"])
        if problem is not None:
            raise ConfigError("%s: [cluster] %s" % (path, problem))
    if c["arbitrator"] is not None and c["arbitrator_command"] is not None:
        raise ConfigError(
            "%s: [cluster] arbitrator_command: set together with arbitrator; "
            "expected one of the two (an address to reach, or a command)" % path)


def _parse_node(path: str, section: str, raw: Dict[str, str], state_db: str) -> NodeConfig:
    """One [node NAME] section (state_db: the cluster's, its default)."""
    name = section.split()[1]
    try:
        _p_name(name)
    except _Invalid as e:
        raise ConfigError("%s: [%s]: node name: expected %s, found %r"
                          % (path, section, e.expected, name)) from None
    n = _parse_section(path, section, NODE_OPTIONS, raw)
    addrs = n["address"]
    if len(set(addrs)) != len(addrs):
        raise ConfigError("%s: [%s] address: lists the same address twice: %s"
                          % (path, section, ", ".join(addrs)))
    ssh_target = n["ssh"] or "root@" + addrs[0]
    return NodeConfig(
        name=name, addresses=addrs, ssh=ssh_target, ssh_port=n["ssh_port"],
        dataset=n["dataset"], state_db=n["state_db"] or state_db)


def _check_pair(path: str, nodes: List[NodeConfig], policy: str) -> None:
    """What the two nodes require of each other: distinct names and
    addresses, one address per link on each, of the same IP version; a
    prefer-node policy names one of them."""
    a, b = nodes
    if (policy.startswith("prefer-node:")
            and policy[len("prefer-node:"):] not in (a.name, b.name)):
        raise ConfigError("%s: [cluster] divergence_policy: expected prefer-node:%s or "
                          "prefer-node:%s (a node of this cluster), found %r"
                          % (path, a.name, b.name, policy))
    if a.name == b.name:  # pragma: no cover - configparser refuses this first
        raise ConfigError("%s: both node sections are named %s" % (path, a.name))
    shared = set(a.addresses) & set(b.addresses)
    if shared:
        raise ConfigError(
            "%s: [node %s] address and [node %s] address: both nodes use %s; "
            "each node needs its own addresses"
            % (path, a.name, b.name, ", ".join(sorted(shared))))
    if len(a.addresses) != len(b.addresses):
        raise ConfigError(
            "%s: [node %s] address: expected one address per link on each node "
            "(node %s has %d), found %d"
            % (path, a.name, b.name, len(b.addresses), len(a.addresses)))
    for i, (x, y) in enumerate(zip(a.addresses, b.addresses)):
        if ipaddress.ip_address(x).version != ipaddress.ip_address(y).version:
            raise ConfigError(
                "%s: [node %s] address: link %d joins %s and %s, which are not "
                "of the same IP version" % (path, a.name, i + 1, x, y))


def _read_secrets(path: str, c: Dict[str, object]) -> Tuple[bytes, Optional[bytes]]:
    """The secret and, during a key change, the previous one (None)."""
    secret = read_secret(c["secret_file"], "cluster", "secret_file", path)
    previous = None
    if c["secret_file_previous"] is not None:
        previous = read_secret(c["secret_file_previous"], "cluster",
                               "secret_file_previous", path)
        if key_id(previous) == key_id(secret):
            raise ConfigError(
                "%s: [cluster] secret_file_previous: holds the same key as "
                "secret_file (key id %s); point it at the old key during a key "
                "change, or leave it empty" % (path, key_id(secret)))
    return secret, previous


def _address_is_local(address: str) -> bool:
    """True when this host (in its network namespace) owns the address:
    binding a socket to a foreign address fails with EADDRNOTAVAIL."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def identify_node(cfg: Config, override: Optional[str] = None,
                  is_local=_address_is_local, hostname: Optional[str] = None) -> str:
    """Which of the two nodes this host is: --node, else the node owning one
    of this host's addresses, else the node named like this host."""
    names = [n.name for n in cfg.nodes]
    if override is not None:
        if override not in names:
            raise ConfigError("--node %s: expected one of the nodes in %s: %s"
                              % (override, cfg.path, ", ".join(names)))
        return override
    owners = [n.name for n in cfg.nodes if any(is_local(a) for a in n.addresses)]
    if len(owners) == 1:
        return owners[0]
    if len(owners) == 2:
        raise ConfigError(
            "%s: this host owns heartbeat addresses of both nodes (%s); "
            "run with --node NAME to say which node it is"
            % (cfg.path, ", ".join(names)))
    host = hostname if hostname is not None else socket.gethostname()
    short = host.split(".")[0]
    for n in cfg.nodes:
        if n.name in (host, short):
            return n.name
    raise ConfigError(
        "%s: this host has none of the heartbeat addresses of nodes %s, and its "
        "host name %r is not a node name; run with --node NAME"
        % (cfg.path, " or ".join("%s (%s)" % (n.name, ", ".join(n.addresses))
                                 for n in cfg.nodes), host))


def _format_value(opt: Option, value) -> str:
    """An option's parsed value written back as the config file spells it."""
    if value is None:
        return ""
    if opt.parse is _p_bool:
        return "yes" if value else "no"
    if opt.parse is _p_command:
        return " ".join(shlex.quote(x) for x in value)
    if opt.parse is _p_addresses:
        return ", ".join(value)
    if opt.parse is _p_send_flags:
        return " ".join(value)
    if opt.parse in (_p_arbitrator, _p_witness):
        return ("[%s]:%d" if ":" in value[0] else "%s:%d") % value
    if isinstance(value, float):
        return "%g" % value
    return str(value)


def describe_config(cfg: Config) -> List[str]:
    """The effective configuration as INI lines, the secret masked."""
    lines = ["# effective configuration of %s" % cfg.path,
             "# this host is node %s" % (cfg.local_name or "(not identified)"),
             "[cluster]"]
    for o in CLUSTER_OPTIONS:
        lines.append("%s = %s" % (o.name, _format_value(o, getattr(cfg, o.name))))
        if o.name == "secret_file":
            lines.append("# secret: %d bytes, masked; key id %s (must match on both nodes)"
                         % (len(cfg.secret), cfg.key_id))
        if o.name == "secret_file_previous" and cfg.secret_previous is not None:
            lines.append("# previous secret: %d bytes, masked; key id %s"
                         % (len(cfg.secret_previous), key_id(cfg.secret_previous)))
    lines += ["", "[service]"]
    for o in SERVICE_OPTIONS:
        lines.append("%s = %s" % (o.name, _format_value(o, getattr(cfg.service, o.name))))
    for n in cfg.nodes:
        lines += ["", "[node %s]%s" % (n.name, "  # this host" if n.name == cfg.local_name else "")]
        for o in NODE_OPTIONS:
            attr = "addresses" if o.name == "address" else o.name
            lines.append("%s = %s" % (o.name, _format_value(o, getattr(n, attr))))
    return lines


# ===========================================================================
# 3. The state store
# ===========================================================================
#
# One sqlite file per node.  Schema changes are migrations applied in order
# (PRAGMA user_version counts how many ran); a fresh file runs them all, an
# old file runs the missing ones, a newer file is refused.  One process at a
# time may write: it holds an exclusive flock on "<state_db>.lock".

STATE_APPLICATION_ID = 0x464C4B52  # "FLKR": marks the file as ours

MIGRATIONS = (
    # 1: own role and epoch, the append-only event log
    """
    CREATE TABLE node_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        node TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('master', 'slave')),
        epoch INTEGER NOT NULL CHECK (epoch >= 0),
        generation INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        level TEXT NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE TRIGGER events_no_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
    CREATE TRIGGER events_no_delete BEFORE DELETE ON events
        BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
    """,
    # 2: peer observations, replication history, preserved divergent data,
    #    the outdated flag, and intents (crash-safe multi-step actions)
    """
    ALTER TABLE node_state ADD COLUMN outdated INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE peer (
        node TEXT PRIMARY KEY,
        seen REAL NOT NULL,
        role TEXT,
        epoch INTEGER,
        generation INTEGER,
        snapshot TEXT,
        guid TEXT,
        health TEXT
    );
    CREATE TABLE replications (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        started REAL NOT NULL,
        finished REAL,
        base TEXT,
        snapshot TEXT NOT NULL,
        guid TEXT,
        bytes INTEGER,
        seconds REAL,
        result TEXT NOT NULL CHECK (result IN ('running', 'ok', 'failed')),
        error TEXT
    );
    CREATE TABLE preserved (
        dataset TEXT PRIMARY KEY,
        created REAL NOT NULL,
        epoch INTEGER NOT NULL,
        origin TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE TABLE intents (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        action TEXT NOT NULL,
        started REAL NOT NULL,
        step TEXT NOT NULL,
        data TEXT NOT NULL DEFAULT '{}',
        finished REAL
    );
    """,
    # 3: the master role handed over by a planned switchover, announced to
    #    the peer until it takes over (whatever path finished the demotion)
    """
    ALTER TABLE node_state ADD COLUMN released INTEGER NOT NULL DEFAULT 0;
    """,
    # 4: the event log is bounded: a recorded trim removes its oldest events
    #    (each trim is a row here and an event); nothing else may delete one
    """
    DROP TRIGGER events_no_delete;
    CREATE TABLE event_trims (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        up_to INTEGER NOT NULL,
        removed INTEGER NOT NULL
    );
    CREATE TRIGGER events_no_delete BEFORE DELETE ON events
        WHEN OLD.id > (SELECT COALESCE(MAX(up_to), 0) FROM event_trims)
        BEGIN SELECT RAISE(ABORT,
            'the event log is append-only: only a recorded trim removes its oldest events');
        END;
    """,
    # 5: the snapshot (GUID) the replica held when a lost divergence verdict
    #    marked it outdated: that mark clears only once it holds a newer one
    #    that is the master's newest (a heartbeat sent before the winner
    #    looked at its own snapshots names the common one)
    """
    ALTER TABLE node_state ADD COLUMN outdated_held TEXT;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


@record
class NodeState:
    node: str
    role: str
    epoch: int
    generation: int
    outdated: bool
    created: float
    released: bool = False    # handed the master role over; the peer may take it
    outdated_held: Optional[str] = None   # the GUID held when a lost verdict marked it


class StateLock:
    """Exclusive advisory lock beside the state file; at most one writer
    (daemon, init, sync...) drives a state file at a time."""

    def __init__(self, db_path: str) -> None:
        self.path = db_path + ".lock"
        self.fd = None  # type: Optional[int]

    def acquire(self, purpose: str) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StateError(_unwritable_message(self.path, e.strerror)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            finally:
                os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise StateError("cannot lock %s: %s" % (self.path, e.strerror)) from None
            raise LockBusy(
                "the state file %s is in use by another flocker-failover process "
                "(%s); only one may drive it at a time: stop that one first, or "
                "talk to the running daemon" % (self.path[:-5], holder or "pid unknown")
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, ("pid %d, %s" % (os.getpid(), purpose)).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _unwritable_message(path: str, reason: str) -> str:
    return ("cannot write the state directory %s: %s; make it writable for "
            "this user or set state_db in the configuration to a path that is"
            % (os.path.dirname(path) or ".", reason))


class StateStore:
    """The node's persistent state.  Every change is one transaction;
    synchronous=FULL so that a committed role change survives power loss."""

    def __init__(self, path: str, conn: sqlite3.Connection,
                 lock: Optional[StateLock]) -> None:
        self.path = path
        self.conn = conn
        self.lock = lock

    # -- opening --------------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, create: bool = False, lock_for: Optional[str] = None,
             lock: Optional[StateLock] = None, deep_check: bool = False,
             readonly: bool = False) -> "StateStore":
        """Open the state file.  create: make it (and its directory) when
        missing.  lock_for: take the single-writer lock, naming the purpose
        (the lock is required to create or migrate the file); or pass a lock
        this process already holds.  deep_check: run PRAGMA quick_check,
        which reads the whole file: where it matters (the daemon's start-up,
        init, 'check --deep', before a migration), not at every open (a
        replication cycle, the gate's status, a cron check), which only
        reads the header and the schema.  readonly: for a command that only
        reads (the gate's role check, status, history): the connection can
        write nothing, not even the checkpoint sqlite makes when the last
        connection closes, which would carry the WAL of a killed daemon
        into a state file restored from a backup meanwhile."""
        directory = os.path.dirname(path) or "."
        exists = os.path.exists(path)
        if not exists and not create:
            raise StateError(
                "no state file at %s: this node was not initialised; run "
                "'flocker_failover.py init --role master' on the node that runs "
                "the service now and '... init --role slave' on the other" % path)
        if not exists:
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            except OSError as e:
                raise StateError(_unwritable_message(path, e.strerror)) from None
            if lock is None and lock_for is None:
                raise StateError("internal error: a state file is created under its lock")
        if lock is None and lock_for is not None:
            lock = StateLock(path)
            lock.acquire(lock_for)
        # sqlite opens a file whose header says WAL by creating -wal and -shm
        # beside it, even to read it: a file refused as corrupt leaves none
        # behind (only the empty ones this open created: nothing else could
        # have used a file that is not a database)
        sidecars = [path + s for s in ("-wal", "-shm") if not os.path.exists(path + s)]
        conn = None
        try:
            conn = cls._connect(path, exists, readonly and not create and lock is None)
            store = cls(path, conn, lock)
            store._check_and_migrate(may_write=lock is not None, fresh=not exists,
                                     deep=deep_check)
            return store
        except BaseException as e:
            if isinstance(e, CorruptState) and conn is not None:
                conn.close()
                if os.path.exists(path + "-wal") and os.path.getsize(path + "-wal") == 0:
                    for extra in sidecars:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(extra)
            if lock is not None:
                lock.release()
            raise

    @staticmethod
    def _connect(path: str, exists: bool, readonly: bool = False) -> sqlite3.Connection:
        try:
            if exists:
                # never let sqlite create a file behind our back
                conn = sqlite3.connect("file:%s?mode=%s" % (_uri_path(path),
                                                           "ro" if readonly else "rw"),
                                       uri=True, timeout=10, isolation_level=None)
            else:
                conn = sqlite3.connect(path, timeout=10, isolation_level=None)
        except sqlite3.Error as e:
            raise StateError(_unwritable_message(path, str(e))) from None
        return conn

    def _check_and_migrate(self, may_write: bool, fresh: bool, deep: bool = False) -> None:
        c = self.conn
        try:
            c.execute("SELECT count(*) FROM sqlite_master").fetchone()   # header, schema
            version = c.execute("PRAGMA user_version").fetchone()[0]
            app_id = c.execute("PRAGMA application_id").fetchone()[0]
            deep = deep or (may_write and not fresh and version < SCHEMA_VERSION)
            check = c.execute("PRAGMA quick_check").fetchone()[0] if deep else "ok"
        except sqlite3.DatabaseError as e:
            raise CorruptState(self._corrupt_message(str(e))) from None
        if check != "ok":
            raise CorruptState(self._corrupt_message("integrity check: " + check))
        if version > SCHEMA_VERSION:
            raise StateError(
                "the state file %s has schema version %d, written by a newer "
                "flocker-failover; this program (%s) knows version %d at most. "
                "The file was left untouched: run the newer program, or restore "
                "a backup made for this version" % (self.path, version, VERSION,
                                                     SCHEMA_VERSION))
        if not fresh and app_id != STATE_APPLICATION_ID:
            raise CorruptState(self._corrupt_message(
                "it is an sqlite database, but not a flocker-failover state file"))
        if version == SCHEMA_VERSION:
            self._tune()
            return
        if not may_write:
            raise StateError(
                "the state file %s has schema version %d; this program uses "
                "version %d and will upgrade it the next time a command that "
                "changes state runs (init, or the daemon)"
                % (self.path, version, SCHEMA_VERSION))
        try:
            if fresh or c.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=FULL")
            c.execute("BEGIN IMMEDIATE")
            for step in range(version, SCHEMA_VERSION):
                for statement in _split_sql(MIGRATIONS[step]):
                    c.execute(statement)
            c.execute("PRAGMA application_id = %d" % STATE_APPLICATION_ID)
            c.execute("PRAGMA user_version = %d" % SCHEMA_VERSION)
            c.execute("COMMIT")
        except sqlite3.Error as e:
            if c.in_transaction:
                c.execute("ROLLBACK")
            if "readonly" in str(e) or "unable to open" in str(e):
                raise StateError(_unwritable_message(self.path, str(e))) from None
            raise StateError("cannot upgrade the state file %s from schema %d to %d: "
                             "%s; it was left as it was"
                             % (self.path, version, SCHEMA_VERSION, e)) from None
        if version > 0:
            log.info("upgraded state file %s from schema %d to %d",
                     self.path, version, SCHEMA_VERSION)
        self._tune()

    def _tune(self) -> None:
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")

    def _corrupt_message(self, detail: str) -> str:
        return ("the state file %s cannot be used (%s). It was left untouched. "
                "Restore it from a backup, or move it aside and run "
                "'flocker_failover.py init --force --role ...' after checking on "
                "both nodes which one holds the newest data" % (self.path, detail))

    def close(self) -> None:
        self.conn.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def relaxed(self):
        """Writes made in here are not synced to disk on their own: the next
        write made outside syncs them with its own (WAL: one sync covers
        every commit before it).  For what may wait for that one (an
        intent's step; the events before a role change, which syncs): a
        sync costs milliseconds on a busy disk, more while zfs writes."""
        self.conn.execute("PRAGMA synchronous=NORMAL")
        try:
            yield self
        finally:
            self.conn.execute("PRAGMA synchronous=FULL")

    @contextlib.contextmanager
    def transaction(self):
        if self.lock is None:
            raise StateError("internal error: state changed without holding its lock")
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    # -- reading --------------------------------------------------------------

    def node_state(self) -> Optional[NodeState]:
        row = self.conn.execute(
            "SELECT node, role, epoch, generation, outdated, created, released, "
            "outdated_held FROM node_state WHERE id = 1").fetchone()
        if row is None:
            return None
        return NodeState(row[0], row[1], row[2], row[3], bool(row[4]), row[5], bool(row[6]),
                         row[7])

    def initialised_state(self) -> NodeState:
        """node_state(), refusing a state file that holds none (created,
        but init never finished) with what to do about it."""
        st = self.node_state()
        if st is None:
            raise StateError("the state file %s holds no node state; run "
                             "'flocker_failover.py init --role ...'" % self.path)
        return st

    def events(self, limit: int = 20, since: float = 0.0) -> List[dict]:
        """The newest `limit` events at or after `since`, oldest first."""
        rows = self.conn.execute(
            "SELECT id, ts, level, kind, message FROM events WHERE ts >= ? "
            "ORDER BY id DESC LIMIT ?", (since, limit)).fetchall()
        return [dict(id=r[0], ts=r[1], level=r[2], kind=r[3], message=r[4])
                for r in reversed(rows)]

    def peer(self, name: str) -> Optional[dict]:
        row = self.conn.execute(
            "SELECT node, seen, role, epoch, generation, snapshot, guid, health "
            "FROM peer WHERE node = ?", (name,)).fetchone()
        if row is None:
            return None
        keys = ("node", "seen", "role", "epoch", "generation", "snapshot", "guid", "health")
        return dict(zip(keys, row))

    def last_replication(self) -> Optional[dict]:
        row = self.conn.execute(
            "SELECT id, started, finished, base, snapshot, guid, bytes, seconds, result, "
            "error FROM replications ORDER BY id DESC LIMIT 1").fetchone()
        if row is None:
            return None
        keys = ("id", "started", "finished", "base", "snapshot", "guid", "bytes",
                "seconds", "result", "error")
        return dict(zip(keys, row))

    def preserved(self) -> List[dict]:
        rows = self.conn.execute(
            "SELECT dataset, created, epoch, origin, reason FROM preserved "
            "ORDER BY created").fetchall()
        return [dict(dataset=r[0], created=r[1], epoch=r[2], origin=r[3], reason=r[4])
                for r in rows]

    def has_history(self) -> bool:
        """True once anything beyond 'init' happened on this node."""
        c = self.conn
        return bool(
            c.execute("SELECT 1 FROM events WHERE kind != 'init' LIMIT 1").fetchone()
            or c.execute("SELECT 1 FROM replications LIMIT 1").fetchone()
            or c.execute("SELECT 1 FROM preserved LIMIT 1").fetchone()
            or c.execute("SELECT 1 FROM peer LIMIT 1").fetchone())

    # -- writing (each a transaction) -----------------------------------------

    def _event(self, conn, kind: str, message: str, level: str = "info") -> None:
        conn.execute("INSERT INTO events (ts, level, kind, message) VALUES (?, ?, ?, ?)",
                     (wall_clock(), level, kind, message))

    def record_event(self, kind: str, message: str, level: str = "info") -> None:
        with self.transaction() as conn:
            self._event(conn, kind, message, level)

    def trim_events(self, keep_rows: int, keep_days: float,
                    now: Optional[float] = None) -> int:
        """Bound the event log: remove its oldest events beyond the newest
        keep_rows, and those older than keep_days (0: no age bound).  The
        trim is recorded (event_trims, and an event that says what went);
        returns how many were removed.  Cheap when there is nothing to do."""
        now = wall_clock() if now is None else now
        c = self.conn
        oldest = c.execute("SELECT id, ts FROM events ORDER BY id LIMIT 1").fetchone()
        if oldest is None:
            return 0
        def nth_newest(n):
            row = c.execute("SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?",
                            (n,)).fetchone()
            return row[0] if row else None
        up_to = 0
        if nth_newest(keep_rows) is not None:    # more than keep_rows: keep_rows - 1
            up_to = nth_newest(keep_rows - 1)     # stay, and the trim's own event
        cutoff = now - keep_days * 86400.0
        if keep_days > 0 and oldest[1] < cutoff:
            up_to = max(up_to, c.execute("SELECT MAX(id) FROM events WHERE ts < ?",
                                         (cutoff,)).fetchone()[0] or 0)
        if up_to < oldest[0]:
            return 0
        with self.transaction() as conn:
            removed = conn.execute("SELECT count(*) FROM events WHERE id <= ?",
                                   (up_to,)).fetchone()[0]
            conn.execute("INSERT INTO event_trims (ts, up_to, removed) VALUES (?, ?, ?)",
                         (now, up_to, removed))
            conn.execute("DELETE FROM events WHERE id <= ?", (up_to,))
            self._event(conn, "trim", "event log trimmed: removed %d event(s) (keep at "
                        "most %d, none older than %s)" % (
                            removed, keep_rows, "%g days" % keep_days if keep_days > 0
                            else "any age"))
        return removed

    def event_trims(self) -> List[dict]:
        rows = self.conn.execute("SELECT ts, up_to, removed FROM event_trims ORDER BY id")
        return [dict(ts=r[0], up_to=r[1], removed=r[2]) for r in rows.fetchall()]

    def initialise(self, node: str, role: str, epoch: int, generation: int = 0) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO node_state (id, node, role, epoch, generation, created) "
                "VALUES (1, ?, ?, ?, ?, ?)", (node, role, epoch, generation, wall_clock()))
            self._event(conn, "init", "initialised node %s as %s, epoch %d"
                        % (node, role, epoch))

    def set_role(self, role: str, epoch: int, reason: str, if_changed: bool = False) -> None:
        """Record role and epoch; if_changed: only when they differ (one
        transaction, no write otherwise)."""
        if role not in ROLES:
            raise ValueError(role)
        with self.transaction() as conn:
            old = conn.execute("SELECT role, epoch FROM node_state WHERE id = 1").fetchone()
            if if_changed and (old[0], old[1]) == (role, epoch):
                return
            if epoch < old[1]:
                raise StateError("internal error: epoch would go back from %d to %d"
                                 % (old[1], epoch))
            # a promotion takes back any release; a demotion records its own
            conn.execute("UPDATE node_state SET role = ?, epoch = ?, released = 0 "
                         "WHERE id = 1", (role, epoch))
            self._event(conn, "role", "%s -> %s, epoch %d -> %d: %s"
                        % (old[0], role, old[1], epoch, reason))

    def set_outdated(self, outdated: bool, reason: str, held: Optional[str] = None) -> None:
        """Persist whether this replica is known to lack the master's data;
        held: the GUID of the snapshot it holds, when it lacks what came
        after that one (a lost verdict)."""
        with self.transaction() as conn:
            conn.execute("UPDATE node_state SET outdated = ?, outdated_held = ? WHERE id = 1",
                         (int(outdated), held if outdated else None))
            self._event(conn, "outdated", ("replica marked OUTDATED: " if outdated else
                                           "replica no longer outdated: ") + reason,
                        "warning" if outdated else "info")

    def set_released(self, released: bool, reason: str) -> None:
        """Persist that this slave handed the master role over (a planned
        switchover's demotion finished) or that the peer took it."""
        with self.transaction() as conn:
            row = conn.execute("SELECT released FROM node_state WHERE id = 1").fetchone()
            if bool(row[0]) == released:
                return
            conn.execute("UPDATE node_state SET released = ? WHERE id = 1", (int(released),))
            self._event(conn, "handover", ("master role released: " if released else
                                           "release ended: ") + reason)

    def last_role_change(self) -> Optional[float]:
        """Wall-clock time of the newest role change, None if none."""
        row = self.conn.execute("SELECT MAX(ts) FROM events WHERE kind = 'role'").fetchone()
        return row[0] if row else None

    def save_peer(self, node: str, seen: float, role: Optional[str],
                  epoch: Optional[int], generation: Optional[int],
                  snapshot: Optional[str], guid: Optional[str],
                  health: Optional[str]) -> None:
        """Remember what the peer last said (seen: wall-clock time)."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO peer (node, seen, role, epoch, generation, "
                "snapshot, guid, health) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (node, seen, role, epoch, generation, snapshot, guid, health))

    def next_generation(self, floor: int = 0) -> int:
        """Raise and return the boot generation (once per daemon start), to
        at least `floor`: the Unix time, as init starts it, so that a state
        file restored from an older backup does not hand out a generation a
        later boot already used (the peer would take its packets for
        replays)."""
        with self.transaction() as conn:
            conn.execute("UPDATE node_state SET generation = MAX(generation + 1, ?) "
                         "WHERE id = 1", (floor,))
            return conn.execute("SELECT generation FROM node_state WHERE id = 1").fetchone()[0]

    def add_preserved(self, dataset: str, epoch: int, origin: str, reason: str) -> None:
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM preserved WHERE dataset = ?", (dataset,)).fetchone():
                return
            conn.execute("INSERT INTO preserved (dataset, created, epoch, origin, reason) "
                         "VALUES (?, ?, ?, ?, ?)", (dataset, wall_clock(), epoch, origin, reason))
            self._event(conn, "preserve", "kept divergent data as %s (%s)" % (dataset, reason),
                        "warning")

    def remove_preserved(self, dataset: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM preserved WHERE dataset = ?", (dataset,))
            self._event(conn, "discard", "the operator discarded the preserved dataset %s"
                        % dataset, "warning")

    # -- intents: multi-step actions that survive a crash ---------------------

    def begin_intent(self, action: str, data: dict) -> int:
        with self.transaction() as conn:
            open_ = conn.execute("SELECT id, action FROM intents WHERE finished IS NULL"
                                 ).fetchone()
            if open_ is not None:
                raise StateError("internal error: %s (intent %d) is unfinished; recover it "
                                 "before starting %s" % (open_[1], open_[0], action))
            cur = conn.execute("INSERT INTO intents (action, started, step, data) "
                               "VALUES (?, ?, 'begin', ?)",
                               (action, wall_clock(), json.dumps(data, sort_keys=True)))
            self._event(conn, action, "%s begins: %s" % (action, data.get("reason", "")))
            return cur.lastrowid

    def intent_step(self, intent_id: int, step: str) -> None:
        """(Not synced on its own, see relaxed(): a recovery runs every step
        again; the step recorded only says where it was cut short.)"""
        with self.relaxed(), self.transaction() as conn:
            conn.execute("UPDATE intents SET step = ? WHERE id = ?", (step, intent_id))

    def finish_intent(self, intent_id: int,
                      then: Optional[Tuple[str, dict]] = None) -> Optional[int]:
        """Record an intent done; with then=(action, data), begin that one in
        the same transaction (a crash between the two cannot lose it) and
        return its id."""
        with self.transaction() as conn:
            row = conn.execute("SELECT action FROM intents WHERE id = ?", (intent_id,)).fetchone()
            conn.execute("UPDATE intents SET finished = ?, step = 'done' WHERE id = ?",
                         (wall_clock(), intent_id))
            self._event(conn, row[0], "%s completed" % row[0])
            if then is None:
                return None
            action, data = then
            cur = conn.execute("INSERT INTO intents (action, started, step, data) "
                               "VALUES (?, ?, 'begin', ?)",
                               (action, wall_clock(), json.dumps(data, sort_keys=True)))
            self._event(conn, action, "%s begins: %s" % (action, data.get("reason", "")))
            return cur.lastrowid

    def unfinished_intent(self) -> Optional[dict]:
        row = self.conn.execute(
            "SELECT id, action, started, step, data FROM intents WHERE finished IS NULL "
            "ORDER BY id LIMIT 1").fetchone()
        if row is None:
            return None
        return dict(id=row[0], action=row[1], started=row[2], step=row[3],
                    data=json.loads(row[4]))

    # -- replication history --------------------------------------------------

    _REPL_KEYS = ("id", "started", "finished", "base", "snapshot", "guid", "bytes",
                  "seconds", "result", "error")

    def begin_replication(self, started: float) -> int:
        """Write the intent of a cycle first (result 'running'); a cycle
        still 'running' in the file belongs to a process that died (we hold
        the lock): marked failed in the same transaction."""
        with self.transaction() as conn:
            self._fail_interrupted(conn, started)
            cur = conn.execute("INSERT INTO replications (started, snapshot, result) "
                               "VALUES (?, '', 'running')", (started,))
            return cur.lastrowid

    def update_replication(self, rid: int, trim: bool = False, **fields) -> None:
        """Record fields of cycle rid; with trim, keep the history bounded
        (trim_replications) in the same transaction."""
        bad = set(fields) - set(self._REPL_KEYS[2:])
        if bad:
            raise ValueError(bad)
        with self.transaction() as conn:
            conn.execute("UPDATE replications SET %s WHERE id = ?"
                         % ", ".join("%s = ?" % k for k in sorted(fields)),
                         [fields[k] for k in sorted(fields)] + [rid])
            if trim:
                self._trim(conn)

    def fail_interrupted_replications(self, now: float) -> int:
        """A cycle still 'running' in the file belongs to a process that
        died (we hold the lock): mark it failed."""
        with self.transaction() as conn:
            return self._fail_interrupted(conn, now)

    @staticmethod
    def _fail_interrupted(conn, now: float) -> int:
        cur = conn.execute(
            "UPDATE replications SET result = 'failed', finished = ?, error = "
            "'interrupted: the process running this cycle ended before it "
            "finished' WHERE result = 'running'", (now,))
        return cur.rowcount

    def unconfirmed_targets(self) -> List[str]:
        """Snapshots a cycle after the newest successful one began to send
        and never confirmed (it failed, or its process died): the peer may
        hold any of them.  Retention keeps them until a cycle sees the peer
        again (then each is either common history or absent there)."""
        rows = self.conn.execute(
            "SELECT snapshot FROM replications WHERE snapshot != '' AND result != 'ok' "
            "AND id > COALESCE((SELECT MAX(id) FROM replications WHERE result = 'ok'), 0)"
        ).fetchall()
        return sorted(set(r[0] for r in rows))

    def trim_replications(self, keep: int = 1000) -> None:
        """Keep the history bounded (a cycle every few seconds adds up)."""
        with self.transaction() as conn:
            self._trim(conn, keep)

    @staticmethod
    def _trim(conn, keep: int = 1000) -> None:
        conn.execute("DELETE FROM replications WHERE id <= "
                     "(SELECT id FROM replications ORDER BY id DESC LIMIT 1 OFFSET ?)",
                     (keep,))

    def replication_summary(self) -> dict:
        """The newest successful cycle that sent something, the newest
        cycle, and the newest error if it came after the last success."""
        def row(where):
            r = self.conn.execute(
                "SELECT %s FROM replications %s ORDER BY id DESC LIMIT 1"
                % (", ".join(self._REPL_KEYS), where)).fetchone()
            return dict(zip(self._REPL_KEYS, r)) if r else None
        last = row("")
        last_ok = row("WHERE result = 'ok'")
        failed = row("WHERE result = 'failed'")
        if failed and last_ok and failed["id"] < last_ok["id"]:
            failed = None
        return {"last": last, "last_ok": last_ok, "last_failed": failed}

    def backup_and_remove(self) -> str:
        """Move the state file aside, its WAL written into it first;
        returns the backup path (set_state_file_aside)."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()
        for suffix in ("-wal", "-shm"):   # empty now: the backup is one file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path + suffix)
        return set_state_file_aside(self.path, "bak")


def set_state_file_aside(path: str, tag: str) -> str:
    """Rename a state file (and its -wal and -shm, where they exist) to
    <path>.<tag>-<UTC time>, with -2, -3... when that name is taken, so
    that nothing is overwritten; returns the new path.  'bak': a good file
    kept by init --force; 'bad': an unusable one kept untouched."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(wall_clock()))
    backup = "%s.%s-%s" % (path, tag, stamp)
    n = 1
    while os.path.exists(backup):
        n += 1
        backup = "%s.%s-%s-%d" % (path, tag, stamp, n)
    os.rename(path, backup)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.rename(path + suffix, backup + suffix)
    return backup


_URI_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~/")


def _uri_path(path: str) -> str:
    """The absolute path, percent-encoded for a sqlite URI (as
    urllib.parse.quote, whose import costs each process 2 ms)."""
    return "".join(chr(b) if b in _URI_SAFE else "%%%02X" % b
                   for b in os.fsencode(os.path.abspath(path)))


def _split_sql(script: str) -> List[str]:
    """Split a migration into statements (triggers hold inner ';')."""
    statements, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        joined = "\n".join(current).strip()
        if joined.endswith(";") and sqlite3.complete_statement(joined):
            statements.append(joined)
            current = []
    if "\n".join(current).strip():
        raise ValueError("unterminated SQL statement in a migration")
    return statements


# ===========================================================================
# 4. The wire protocol
# ===========================================================================
#
# One heartbeat is one UDP datagram, at most WIRE_MAX bytes, so it is never
# fragmented.  All integers are big-endian.  Version 1 layout:
#
#   offset size  field
#    0     4     magic "FLKH"
#    4     1     version (1)
#    5     1     flags (bit 0: handover request, bit 1: release, bit 2:
#                serving, bit 3: the receiver's replica is outdated, bit 4:
#                resolving a divergence)
#    6     4     key id: the first 4 bytes of the signing key's id
#   10     8     boot generation of the sender (raised at every daemon start)
#   18     8     sequence number (1, 2, ... within one generation)
#   26     8     echo generation: the generation of the newest packet the
#   34     8     echo sequence:   sender received from us, and its sequence
#                                 (0, 0: it has heard nothing from us yet)
#   42     8     epoch of the sender
#   50     1     role (1 master, 2 slave)
#   51     1     service health (0 unknown, 1 ok, 2 failed, 3 unchecked)
#   52     2     body length (bytes between offset 54 and the MAC)
#   54     ...   body: cluster name, sender node, newest snapshot name (each
#                one length byte + UTF-8), snapshot GUID (8 bytes, 0: none),
#                accepted key ids (one count byte, 0..2, + 4 bytes each)
#   end-32 32    HMAC-SHA256 with the cluster secret over all bytes before it
#
# decode_heartbeat() checks the cheap things first (size, magic, version,
# key id, lengths) and the MAC before it looks inside the body; nothing in a
# packet is trusted before its MAC is verified.  Freshness needs no clock:
# a ReplayWindow accepts each (generation, sequence) once, and the echo
# proves when the packet was made: after we sent the packet it echoes.  So
# a packet recorded by an attacker and replayed later (say after this node
# restarted and forgot which sequence numbers it had seen) is not taken as
# a sign of life: it echoes none of our recent packets.

WIRE_MAGIC = b"FLKH"
WIRE_VERSION = 1
WIRE_MAX = 1200
_WIRE_HEAD = struct.Struct("!4sBB4sQQQQQBBH")
_WIRE_MAC = 32
_WIRE_MIN = _WIRE_HEAD.size + 3 + 8 + 1 + _WIRE_MAC
_U64_MAX = 2 ** 64 - 1


def _guid_number(guid: Optional[str]) -> int:
    """A snapshot's GUID as zfs prints it, as a heartbeat carries it (an
    unsigned 64-bit number; 0: none, or not a number)."""
    return int(guid) & _U64_MAX if guid and guid.isdigit() else 0


FLAG_HANDOVER_REQUEST = 0x01  # a slave asks its master for a planned switchover
FLAG_RELEASE = 0x02           # a former master handed over: the slave may promote
FLAG_SERVING = 0x04           # the sender runs the user system now
FLAG_PEER_OUTDATED = 0x08     # a master: the receiver lacks data written here
FLAG_RESOLVING = 0x10         # the sender is resolving a divergence: join in

_ROLE_CODE = {ROLE_MASTER: 1, ROLE_SLAVE: 2}
_ROLE_OF = {v: k for k, v in _ROLE_CODE.items()}
HEALTH_STATES = ("unknown", "ok", "failed", "unchecked")

# Every reason a packet is rejected for; status shows a counter for each.
REJECT_REASONS = ("truncated", "oversized", "malformed", "bad_version",
                  "unknown_key", "bad_mac", "wrong_cluster", "wrong_sender",
                  "old_generation", "replay")


class WireReject(Exception):
    """A received packet is not a valid, fresh heartbeat from the peer."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__("%s%s" % (reason, (": " + detail) if detail else ""))
        self.reason = reason
        self.detail = detail


@record
class Heartbeat:
    cluster: str
    sender: str
    generation: int
    sequence: int
    role: str
    epoch: int
    snapshot: str = ""
    guid: int = 0
    health: str = "unknown"
    flags: int = 0
    echo_generation: int = 0        # newest (generation, sequence) the sender
    echo_sequence: int = 0          # had received from the receiver
    accepts: Tuple[str, ...] = ()   # key ids the sender accepts
    key_id: str = ""                # key id it was signed with (set by decode)


def _key_bytes(kid: str) -> bytes:
    return bytes.fromhex(kid)[:4]


def encode_heartbeat(hb: Heartbeat, secret: bytes, kid: Optional[str] = None) -> bytes:
    """The signed datagram for hb, signed with secret (whose key_id is
    kid, when the caller knows it)."""
    def text(value: str, limit: int) -> bytes:
        raw = value.encode("utf-8")
        if len(raw) > limit:
            raise ValueError("heartbeat field too long: %r" % value)
        return bytes([len(raw)]) + raw
    if len(hb.accepts) > 2:
        raise ValueError("at most two accepted key ids")
    body = (text(hb.cluster, 32) + text(hb.sender, 32) + text(hb.snapshot, 255)
            + struct.pack("!QB", hb.guid, len(hb.accepts))
            + b"".join(_key_bytes(k) for k in hb.accepts))
    head = _WIRE_HEAD.pack(WIRE_MAGIC, WIRE_VERSION, hb.flags & 0xFF,
                           _key_bytes(kid or key_id(secret)), hb.generation, hb.sequence,
                           hb.echo_generation, hb.echo_sequence, hb.epoch,
                           _ROLE_CODE[hb.role],
                           HEALTH_STATES.index(hb.health), len(body))
    packet = head + body
    return packet + hmac.digest(secret, packet, "sha256")


def wire_keys(*secrets_: Optional[bytes]) -> Dict[bytes, Tuple[str, bytes]]:
    """{4-byte key id: (key id, secret)} for the keys a node accepts."""
    return {_key_bytes(key_id(s)): (key_id(s), s) for s in secrets_ if s is not None}


def _signed_by(keys: Dict[bytes, Tuple[str, bytes]], magic: bytes, version: int, kid: bytes,
               want_magic: bytes, want_version: int, what: str) -> Tuple[str, bytes]:
    """The key a datagram says it is signed with, after its magic and
    version were checked (the MAC is checked by _check_mac)."""
    if magic != want_magic:
        raise WireReject("malformed", "not a flocker-failover %s" % what)
    if version != want_version:
        raise WireReject("bad_version", "version %d, this program speaks %d"
                         % (version, want_version))
    key = keys.get(kid)
    if key is None:
        raise WireReject("unknown_key", "key id %s" % kid.hex())
    return key


def _check_mac(packet: bytes, key: Tuple[str, bytes]) -> None:
    mac = hmac.digest(key[1], packet[:-_WIRE_MAC], "sha256")
    if not hmac.compare_digest(mac, packet[-_WIRE_MAC:]):
        raise WireReject("bad_mac", "key id %s" % key[0])


def decode_heartbeat(packet: bytes, keys: Dict[bytes, Tuple[str, bytes]]) -> Heartbeat:
    """Verify and parse one datagram; raise WireReject(reason) otherwise.
    keys: see wire_keys()."""
    n = len(packet)
    if n > WIRE_MAX:
        raise WireReject("oversized", "%d bytes" % n)
    if n < _WIRE_MIN:
        raise WireReject("truncated", "%d bytes" % n)
    (magic, version, flags, kid, generation, sequence, echo_generation, echo_sequence,
     epoch, role, health, body_len) = _WIRE_HEAD.unpack_from(packet)
    key = _signed_by(keys, magic, version, kid, WIRE_MAGIC, WIRE_VERSION, "heartbeat")
    expected_len = _WIRE_HEAD.size + body_len + _WIRE_MAC
    if n < expected_len:
        raise WireReject("truncated", "%d of %d bytes" % (n, expected_len))
    if n > expected_len:
        raise WireReject("malformed", "%d bytes after the end" % (n - expected_len))
    _check_mac(packet, key)
    # authenticated from here on; still parse defensively
    body = packet[_WIRE_HEAD.size:-_WIRE_MAC]
    pos = 0
    fields = []
    try:
        for limit in (32, 32, 255):
            length = body[pos]
            if length > limit:
                raise WireReject("malformed", "text field too long")
            fields.append(body[pos + 1:pos + 1 + length].decode("utf-8"))
            if len(fields[-1].encode("utf-8")) != length:
                raise WireReject("malformed", "text field cut short")
            pos += 1 + length
        guid, count = struct.unpack_from("!QB", body, pos)
        pos += 9
        if count > 2 or pos + 4 * count != len(body):
            raise WireReject("malformed", "bad key list or length")
        accepts = tuple(body[pos + 4 * i:pos + 4 * i + 4].hex() for i in range(count))
    except (IndexError, struct.error, UnicodeDecodeError):
        raise WireReject("malformed", "body does not parse") from None
    if role not in _ROLE_OF or health >= len(HEALTH_STATES) or sequence == 0:
        raise WireReject("malformed", "bad role, health or sequence")
    cluster, sender, snapshot = fields
    if not _NAME_RE.match(cluster) or not _NAME_RE.match(sender):
        raise WireReject("malformed", "bad cluster or node name")
    return Heartbeat(cluster=cluster, sender=sender, generation=generation,
                     sequence=sequence, role=_ROLE_OF[role], epoch=epoch,
                     snapshot=snapshot, guid=guid, health=HEALTH_STATES[health],
                     flags=flags, echo_generation=echo_generation,
                     echo_sequence=echo_sequence, accepts=accepts, key_id=key[0])


def check_origin(hb: Heartbeat, cluster: str, peer: str) -> None:
    """Raise WireReject unless hb comes from our peer in our cluster (a
    packet naming this node itself as sender fails too)."""
    if hb.cluster != cluster:
        raise WireReject("wrong_cluster", "cluster %r, expected %r" % (hb.cluster, cluster))
    if hb.sender != peer:
        raise WireReject("wrong_sender", "sender %r, expected %r" % (hb.sender, peer))


def choose_send_key(own: Sequence[bytes], peer_accepts: Sequence[str],
                    ids: Optional[Sequence[str]] = None) -> bytes:
    """The key to sign with: the current one (own[0]) unless the peer said
    it accepts only the other one we hold (during a key change).  ids: the
    key_id of each of own, when the caller knows them."""
    ids = ids or [key_id(s) for s in own]
    if not peer_accepts or ids[0] in peer_accepts:
        return own[0]
    for s, kid in zip(own[1:], ids[1:]):
        if kid in peer_accepts:
            return s
    return own[0]


class ReplayWindow:
    """Accepts each (generation, sequence) at most once, in any order within
    the last WINDOW sequence numbers of the newest generation; rejects older
    generations.  No clock is involved, so a clock step cannot fool it."""

    WINDOW = 64

    def __init__(self, generation: int = 0) -> None:
        self.generation = generation   # the newest generation seen (or known)
        self.highest = 0               # the highest sequence seen in it
        self.seen = 0                  # bit i: highest - i was seen

    def check(self, generation: int, sequence: int) -> Optional[str]:
        """None when fresh, else the reject reason; changes nothing."""
        if generation < self.generation:
            return "old_generation"
        if generation > self.generation or sequence > self.highest:
            return None
        back = self.highest - sequence
        if back >= self.WINDOW or self.seen >> back & 1:
            return "replay"
        return None

    def accept(self, generation: int, sequence: int) -> None:
        if generation > self.generation or self.highest == 0:
            # the first packet of a generation: nothing sent before it (which
            # an attacker may have captured) is accepted afterwards
            self.generation, self.highest = generation, sequence
            self.seen = (1 << self.WINDOW) - 1
        elif sequence > self.highest:
            shift = sequence - self.highest
            self.seen = ((self.seen << shift) | 1) & ((1 << self.WINDOW) - 1) \
                if shift < self.WINDOW else 1
            self.highest = sequence
        else:
            self.seen |= 1 << (self.highest - sequence)


# -- the witness's datagrams --------------------------------------------------
#
# A node asks the witness for its lease with one UDP datagram and gets one
# back (at most WIRE_MAX bytes each).  Both are signed like heartbeats:
# HMAC-SHA256 with the cluster's secret, the key chosen by its key id (a
# witness serving several clusters holds each cluster's keys under its
# name).  Version 1 layout, integers big-endian:
#
#   offset size  field
#    0     4     magic "FLKW"
#    4     1     version (1)
#    5     1     kind (1 request, 2 answer)
#    6     4     key id: the first 4 bytes of the signing key's id
#   10    16     nonce: random, made by the node for this request; the
#                answer echoes it
#   26     8     the node's boot generation   } the request's; the answer
#   34     8     the node's request sequence  } echoes both
#   42     4     lease in milliseconds: asked for / granted (0: not granted)
#   46     1     answer: 0 (a request), 1 granted, 2 held by another node,
#                3 waiting (a restarted witness waits out the leases it may
#                have granted), 4 refused (see the holder field for why)
#   47     4     wait in milliseconds: when the asker may get it at the
#                earliest (answers 2 and 3)
#   51     ...   cluster name, node name (the requester, also in the
#                answer), holder (answer 2: the holding node; answer 4:
#                the reason): each one length byte + UTF-8
#   end-32 32    HMAC-SHA256 over all bytes before it
#
# Freshness: the witness accepts each node's (generation, sequence) only
# when it is above the last it accepted from that node, so a recorded
# request replayed is dropped without an answer; the node accepts only the
# answer that echoes the nonce (and generation, sequence) of the request it
# is waiting for, so a recorded answer replayed is worth nothing.

WITNESS_MAGIC = b"FLKW"
WITNESS_VERSION = 1
WITNESS_REQUEST, WITNESS_ANSWER = 1, 2
WITNESS_GRANTED, WITNESS_HELD, WITNESS_WAITING, WITNESS_REFUSED = 1, 2, 3, 4
WITNESS_ANSWERS = {WITNESS_GRANTED: "granted", WITNESS_HELD: "held",
                   WITNESS_WAITING: "waiting", WITNESS_REFUSED: "refused"}
_WITNESS_HEAD = struct.Struct("!4sBB4s16sQQIBI")
_WITNESS_MIN = _WITNESS_HEAD.size + 3 + _WIRE_MAC
_U32_MAX = 2 ** 32 - 1


@record
class WitnessMessage:
    kind: int                 # WITNESS_REQUEST or WITNESS_ANSWER
    cluster: str
    node: str                 # the requester
    nonce: bytes
    generation: int
    sequence: int
    lease_ms: int = 0
    answer: int = 0           # 0 in a request
    wait_ms: int = 0
    holder: str = ""          # answer HELD: the holder; REFUSED: why
    key_id: str = ""          # set by decode_witness


def encode_witness(m: WitnessMessage, secret: bytes) -> bytes:
    def text(value: str, limit: int) -> bytes:
        raw = value.encode("utf-8")
        if len(raw) > limit:
            raise ValueError("witness message field too long: %r" % value)
        return bytes([len(raw)]) + raw
    if len(m.nonce) != 16:
        raise ValueError("the nonce must be 16 bytes")
    packet = _WITNESS_HEAD.pack(
        WITNESS_MAGIC, WITNESS_VERSION, m.kind, _key_bytes(key_id(secret)), m.nonce,
        m.generation, m.sequence, min(m.lease_ms, _U32_MAX), m.answer,
        min(m.wait_ms, _U32_MAX)) + text(m.cluster, 32) + text(m.node, 32) + \
        text(m.holder, 200)
    return packet + hmac.new(secret, packet, hashlib.sha256).digest()


def witness_cluster(packet: bytes) -> Optional[str]:
    """The cluster a datagram names, UNVERIFIED: only to choose the keys to
    verify it with (a witness serves several clusters)."""
    try:
        n = packet[_WITNESS_HEAD.size]
        return packet[_WITNESS_HEAD.size + 1:_WITNESS_HEAD.size + 1 + n].decode("utf-8")
    except (IndexError, UnicodeDecodeError):
        return None


def decode_witness(packet: bytes, keys: Dict[bytes, Tuple[str, bytes]]) -> WitnessMessage:
    """Verify and parse one witness datagram; raise WireReject(reason)
    otherwise (the reasons of REJECT_REASONS).  keys: see wire_keys()."""
    n = len(packet)
    if n > WIRE_MAX:
        raise WireReject("oversized", "%d bytes" % n)
    if n < _WITNESS_MIN:
        raise WireReject("truncated", "%d bytes" % n)
    (magic, version, kind, kid, nonce, generation, sequence, lease_ms, answer,
     wait_ms) = _WITNESS_HEAD.unpack_from(packet)
    key = _signed_by(keys, magic, version, kid, WITNESS_MAGIC, WITNESS_VERSION,
                     "witness message")
    _check_mac(packet, key)
    body = packet[_WITNESS_HEAD.size:-_WIRE_MAC]
    fields, pos = [], 0
    try:
        for limit in (32, 32, 200):
            length = body[pos]
            if length > limit or pos + 1 + length > len(body):
                raise WireReject("malformed", "text field too long")
            fields.append(body[pos + 1:pos + 1 + length].decode("utf-8"))
            pos += 1 + length
    except (IndexError, UnicodeDecodeError):
        raise WireReject("malformed", "body does not parse") from None
    if pos != len(body):
        raise WireReject("malformed", "%d bytes after the end" % (len(body) - pos))
    cluster, node, holder = fields
    if (kind not in (WITNESS_REQUEST, WITNESS_ANSWER) or sequence == 0
            or (kind == WITNESS_REQUEST) != (answer == 0)
            or (kind == WITNESS_ANSWER and answer not in WITNESS_ANSWERS)
            or not _NAME_RE.match(cluster) or not _NAME_RE.match(node)):
        raise WireReject("malformed", "bad kind, answer, sequence or name")
    return WitnessMessage(kind=kind, cluster=cluster, node=node, nonce=nonce,
                          generation=generation, sequence=sequence, lease_ms=lease_ms,
                          answer=answer, wait_ms=wait_ms, holder=holder, key_id=key[0])


# ===========================================================================
# 5. Adapters: ZFS, ssh, commands, addresses
# ===========================================================================

ZFS_TIMEOUT = 60.0


def _stderr_text(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines()
             if ln.strip() and not _is_noise(ln)]
    return "; ".join(lines[-5:]) or "(no message)"


# Lines some zfs builds print on every command; they say nothing about errors.
_NOISE = ("Defaulting to 4K blocksize",)


def _is_noise(line: str) -> bool:
    return any(n in line for n in _NOISE)


# What zfs means by its error texts: the one place that reads them.  Each
# kind lists its wordings in OpenZFS 2.x and zfs-fuse (the suite runs on both).
_ZFS_SAYS = {
    "missing": ("does not exist",),                  # no such dataset/snapshot
    "busy": ("is busy",),                            # zfs-fuse: unmount still ending
    "hold_exists": ("already exists",),              # zfs hold: the tag is there
    "no_tag": ("no such tag",),                      # zfs release: nothing to release
    "no_space": ("out of space", "No space left"),   # zfs recv: the pool is full
    "modified": ("has been modified",),              # zfs recv: replica written to
    "no_property": ("invalid property",),            # zfs-fuse: no receive_resume_token
    "cloned": ("dependent clones", "snapshot is cloned"),   # zfs destroy: a clone pins it
    "no_key": ("key must be loaded",),               # zfs send (not raw): key not loaded
}


def zfs_says(kind: str, text: str) -> bool:
    """True when zfs output `text` reports an error of this kind (pure)."""
    return any(words in (text or "") for words in _ZFS_SAYS[kind])


# -- where an action's time goes ----------------------------------------------

class Timeline:
    """The moments (monotonic) of one action's steps and the commands it
    ran, for the line that tells an operator where its time went (a
    promotion's, in the event log and the daemon's log).  Times are shown
    in ms after `origin`, e.g. the moment the peer's silence passed
    dead_time; `origin_wall` is that moment as Unix time."""

    def __init__(self, origin: float, what: str) -> None:
        self.origin = origin
        self.what = what           # what the origin is, in words
        self.origin_wall = wall_clock() - (time.monotonic() - origin)
        self.marks = []            # type: List[Tuple[float, str]]

    def mark(self, label: str, at: Optional[float] = None) -> None:
        self.marks.append((time.monotonic() if at is None else at, label))

    def ran(self, label: str, started: float) -> None:
        """A command that began at `started` has ended now."""
        now = time.monotonic()
        self.marks.append((now, "%s (%.1f ms)" % (label, 1000 * (now - started))))

    def text(self) -> str:
        return "ms after %s (Unix time %.6f): %s" % (
            self.what, self.origin_wall,
            "; ".join("+%.1f %s" % (1000 * (at - self.origin), label)
                      for at, label in self.marks))


# -- what a zfs command line supports -----------------------------------------
#
# zfs has no "list your features" command, so we read its usage text:
# `zfs` alone prints the sub-command synopsis, `zfs get` alone adds the
# property table.  Both are kept beside the state file (zfs_usage_text),
# on the peer by its gate ("features").

@record
class ZfsFeatures:
    resumable: bool = False        # zfs recv -s, zfs send -t, receive_resume_token
    written: bool = False          # the 'written' property ("changed since snapshot?")
    destroy_multi: bool = False    # zfs destroy ds@a,b,c in one command
    list_parsable: bool = False    # zfs list -p
    createtxg: bool = False        # the 'createtxg' property
    clones: bool = False           # the snapshots' 'clones' property (not zfs-fuse)
    recv_exclude: bool = False     # zfs recv -x PROPERTY (not zfs-fuse)
    send_flags: frozenset = frozenset()   # which of _SEND_FLAGS zfs send takes
    send_estimate: bool = False    # zfs send -n -P: the stream's size, beforehand (not zfs-fuse)
    encryption: bool = False       # native encryption: keystatus, zfs load-key (not zfs-fuse)


def zfs_properties(usage: str) -> Set[str]:
    """The native properties named in the property table of `zfs get`'s
    usage text (pure)."""
    return set(re.findall(r"^\s+([a-z_]+)\s+(?:YES|NO)\s+(?:YES|NO)\s", usage, re.M))


def parse_zfs_features(usage: str) -> ZfsFeatures:
    """Features from the usage text of `zfs` and `zfs get` (pure)."""
    def synopsis_flags(command):
        found = set()
        for m in re.finditer(r"^\s*%s \[-([A-Za-z]+)\]" % command, usage, re.M):
            found.update(m.group(1))
        return found
    props = zfs_properties(usage)
    send = synopsis_flags("send")
    recv = synopsis_flags("receive") | synopsis_flags("recv")
    send_t = re.search(r"^\s*send \[[^\n]*-t <?receive_resume_token", usage, re.M)
    return ZfsFeatures(
        resumable=bool("s" in recv and send_t and "receive_resume_token" in props),
        written="written" in props,
        destroy_multi=bool(re.search(r"^\s*destroy [^\n]*@<snap>[^\n]*\[,\.\.\.\]",
                                     usage, re.M)),
        list_parsable="p" in synopsis_flags("list"),
        createtxg="createtxg" in props,
        clones="clones" in props,
        recv_exclude=bool(re.search(r"^\s*rec(?:ei)?v(?:e)? \[[^\n]*\[-x <?property>?\]",
                                    usage, re.M)),
        send_flags=frozenset(f for f in _SEND_FLAGS if f[1] in send),
        send_estimate="n" in send and "P" in send,
        encryption="keystatus" in props)


# -- listings -----------------------------------------------------------------

SNAPSHOT_PREFIX = "flocker-"
HOLD_TAG = "flocker"
ROLE_PROPERTY = "flocker:role"
DIVERGENCE_PROPERTY = "flocker:divergence"   # a node's facts while a divergence is resolved
_SNAPSHOT_RE = re.compile(r"^flocker-(\d+)-(\d{8}T\d{6})(?:\.(\d{3}))?Z(?:-\d+)?$")


@record
class Snap:
    name: str        # the part after '@'
    guid: str
    userrefs: int    # holds of any tag
    order: int       # createtxg where known, else position in the listing
    pinned: bool = False   # a clone depends on it (where zfs lists 'clones')


@record
class Listing:
    """One dataset and its own snapshots, oldest first."""
    dataset: str
    props: Dict[str, str]
    snaps: Tuple[Snap, ...]

    def snap(self, name: str) -> Optional[Snap]:
        for s in self.snaps:
            if s.name == name:
                return s
        return None

    @property
    def guids(self) -> Dict[str, Snap]:
        return {s.guid: s for s in self.snaps}


def listing_args(dataset: str, features: ZfsFeatures) -> List[str]:
    """`zfs get` arguments listing a dataset and its snapshots.  zfs-fuse's
    get has no -t and its list no -p, so one get with -d 1 serves all."""
    props = ["guid", "userrefs", "readonly", ROLE_PROPERTY, DIVERGENCE_PROPERTY]
    if features.written:
        props.append("written")
    if features.createtxg:
        props.append("createtxg")
    if features.clones:
        props.append("clones")
    if features.resumable:
        props.append("receive_resume_token")
    return ["get", "-H", "-p", "-o", "name,property,value", ",".join(props),
            "-d", "1", dataset]


@record
class TreeNode:
    """One dataset of a tree: its snapshots' GUIDs by name, and the token
    of a partial resumable receive ('' without one)."""
    snaps: Dict[str, str]
    token: str = ""


def tree_args(dataset: str, features: ZfsFeatures) -> List[str]:
    """`zfs get` arguments listing the dataset's whole tree (-r)."""
    props = ["guid"] + (["receive_resume_token"] if features.resumable else [])
    return ["get", "-H", "-p", "-o", "name,property,value", ",".join(props), "-r", dataset]


def parse_tree(text: str, dataset: str) -> Dict[str, TreeNode]:
    """Parse `zfs get -r` output of guid (and receive_resume_token) into
    {dataset name: TreeNode} for dataset and those below it (pure)."""
    snaps = {}    # type: Dict[str, Dict[str, str]]
    tokens = {}   # type: Dict[str, str]
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        name, prop, value = parts
        ds, at, snap = name.partition("@")
        if ds != dataset and not ds.startswith(dataset + "/"):
            continue
        snaps.setdefault(ds, {})
        if at and prop == "guid":
            snaps[ds][snap] = value
        elif not at and prop == "receive_resume_token" and value not in ("", "-"):
            tokens[ds] = value
    return {ds: TreeNode(snaps[ds], tokens.get(ds, "")) for ds in snaps}


class MountView:
    """The dataset and the file systems and volumes below it as one
    `zfs list -r` shows them (view_args): what a promotion must know before
    it mounts, read in one command, instead of one command per question
    (pure)."""

    COLUMNS = ("name", "type", "mounted", "canmount", "mountpoint")

    def __init__(self, dataset: str, rows: Dict[str, Dict[str, str]]) -> None:
        self.dataset = dataset
        self.rows = rows           # name -> column -> value

    @classmethod
    def args(cls, dataset: str, features: ZfsFeatures) -> List[str]:
        cols = cls.COLUMNS + (("receive_resume_token",) if features.resumable else ())
        return ["list", "-H", "-o", ",".join(cols), "-r", "-t", "filesystem,volume", dataset]

    @classmethod
    def parse(cls, text: str, dataset: str, resumable: bool) -> "MountView":
        cols = cls.COLUMNS + (("receive_resume_token",) if resumable else ())
        rows = {}
        for line in text.splitlines():
            values = line.split("\t")
            if len(values) == len(cols) and (values[0] == dataset or
                                             values[0].startswith(dataset + "/")):
                rows[values[0]] = dict(zip(cols, values))
        return cls(dataset, rows)

    def exists(self) -> bool:
        return self.dataset in self.rows

    def is_volume(self) -> bool:
        return self.rows.get(self.dataset, {}).get("type") == "volume"

    def mounted(self, name: str) -> bool:
        return self.rows.get(name, {}).get("mounted") == "yes"

    def resume_token(self) -> str:
        token = self.rows.get(self.dataset, {}).get("receive_resume_token", "")
        return "" if token in ("", "-") else token

    def to_mount_below(self) -> List[str]:
        """The file systems below the dataset that mount automatically
        (canmount=on, a mountpoint of their own), parents first."""
        return sorted(n for n, r in self.rows.items() if n != self.dataset
                      and r["type"] == "filesystem" and r["canmount"] == "on"
                      and r["mountpoint"] not in ("none", "legacy"))


def parse_listing(text: str, dataset: str) -> Listing:
    """Parse `zfs get -H -p -o name,property,value` output (pure)."""
    rows = {}   # type: Dict[str, Dict[str, str]]
    order = []  # type: List[str]
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        name, prop, value = parts
        if name != dataset and not name.startswith(dataset + "@"):
            continue   # children, bookmarks
        if name not in rows:
            rows[name] = {}
            order.append(name)
        rows[name][prop] = value
    snaps = []
    for position, name in enumerate(order):
        if "@" not in name:
            continue
        p = rows[name]
        refs = p.get("userrefs", "0")
        txg = p.get("createtxg", "")
        snaps.append(Snap(name=name.split("@", 1)[1], guid=p.get("guid", ""),
                          userrefs=int(refs) if refs.isdigit() else 0,
                          order=int(txg) if txg.isdigit() else position,
                          pinned=p.get("clones", "-") not in ("-", "")))
    snaps.sort(key=lambda s: s.order)
    return Listing(dataset, rows.get(dataset, {}), tuple(snaps))


def _missing(stderr: str) -> bool:
    return zfs_says("missing", stderr)


_PARSED_USAGE = {}   # type: Dict[str, ZfsFeatures]   usage text: its features


class ZfsBase:
    """zfs operations, the same whether zfs runs here or on the peer; the
    subclasses say how one command runs."""

    where = "on this host"
    _features = None  # type: Optional[ZfsFeatures]

    def run(self, args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
        raise NotImplementedError

    def run_many(self, commands: Sequence[Sequence[str]]) -> List[Tuple[int, str]]:
        """Run several zfs commands (each a list of arguments); returns
        (exit status, output) of each, one after the other (on the peer:
        a request over the gate session each)."""
        out = []
        for args in commands:
            proc = self.run(args, check=False)
            out.append((proc.returncode, proc.stdout + proc.stderr))
        return out

    def _usage_text(self) -> str:
        raise NotImplementedError

    def features(self) -> ZfsFeatures:
        if self._features is None:
            text = self._usage_text()
            parsed = _PARSED_USAGE.get(text)     # (a new Zfs every daemon cycle)
            if parsed is None:
                parsed = parse_zfs_features(text)
                if len(_PARSED_USAGE) < 8:
                    _PARSED_USAGE[text] = parsed
            self._features = parsed
        return self._features

    def _fail(self, args: Sequence[str], stderr: str) -> ZfsError:
        return ZfsError("'zfs %s' failed %s: %s" % (" ".join(args), self.where,
                                                     _stderr_text(stderr)))

    def listing(self, dataset: str) -> Optional[Listing]:
        """The dataset's properties and snapshots; None when it does not exist."""
        args = listing_args(dataset, self.features())
        proc = self.run(args, check=False)
        if proc.returncode != 0:
            if _missing(proc.stderr):
                return None
            raise self._fail(args, proc.stderr)
        return parse_listing(proc.stdout, dataset)

    def snapshot(self, dataset: str, name: str, recursive: bool) -> None:
        self.run(["snapshot"] + (["-r"] if recursive else []) + ["%s@%s" % (dataset, name)])

    def tree(self, dataset: str) -> Dict[str, "TreeNode"]:
        """The dataset and every dataset below it (recursive = yes), by
        name: snapshot GUIDs and receive_resume_token (see parse_tree)."""
        args = tree_args(dataset, self.features())
        proc = self.run(args, check=False)
        if proc.returncode != 0:
            if _missing(proc.stderr):
                return {}
            raise self._fail(args, proc.stderr)
        return parse_tree(proc.stdout, dataset)

    def settle(self, pool: str) -> bool:
        """Make the pool commit what was written (zpool sync).  False where
        that cannot be done: then nothing may be concluded from 'written'."""
        return False

    def written(self, dataset: str) -> Optional[str]:
        """The dataset's 'written' property, read now ('0': nothing new)."""
        proc = self.run(["get", "-H", "-p", "-o", "value", "written", dataset], check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def set_prop(self, dataset: str, prop: str, value: str) -> None:
        self.run(["set", "%s=%s" % (prop, value), dataset])

    def send_stream_is_empty(self, dataset: str, old: str, new: str) -> bool:
        """True when the incremental stream old -> new carries no change:
        exactly a BEGIN and an END record (312 bytes each, types 0 and 5)."""
        raise NotImplementedError

    def abort_partial_receive(self, dataset: str) -> bool:
        """Discard the partial state of an interrupted resumable receive
        (OpenZFS 'recv -s', named by receive_resume_token): 'zfs recv -A'.
        It holds only part of a stream whose whole exists on its sender;
        complete snapshots and the dataset's own data are never touched (a
        partial first receive is a dataset that was never complete, and
        goes).  Returns True when there was some.  Where the ZFS has no
        resumable receive (zfs-fuse), an interrupted receive leaves nothing
        behind and nothing is run."""
        if not self.features().resumable:
            return False
        proc = self.run(["get", "-H", "-p", "-o", "value", "receive_resume_token", dataset],
                        check=False)
        if proc.returncode != 0:
            if zfs_says("no_property", proc.stderr):
                return False
            raise self._fail(["get", "receive_resume_token", dataset], proc.stderr)
        if proc.stdout.strip() in ("", "-"):
            return False
        self.run(["recv", "-A", dataset])
        return True


def hold_commands(dataset: str, names: Sequence[str], recursive: bool) -> List[List[str]]:
    r = ["-r"] if recursive else []
    return [["hold"] + r + [HOLD_TAG, "%s@%s" % (dataset, n)] for n in names]


def release_commands(dataset: str, names: Sequence[str], recursive: bool) -> List[List[str]]:
    r = ["-r"] if recursive else []
    return [["release"] + r + [HOLD_TAG, "%s@%s" % (dataset, n)] for n in names]


def destroy_commands(dataset: str, names: Sequence[str], recursive: bool,
                     features: ZfsFeatures) -> List[List[str]]:
    """Snapshot destruction: one command when zfs takes ds@a,b,c, else one
    per snapshot (run in one round trip on the peer).  Only retention calls
    this, with names plan_prune chose."""
    if not names:
        return []
    r = ["-r"] if recursive else []
    if features.destroy_multi:
        return [["destroy"] + r + ["%s@%s" % (dataset, ",".join(names))]]
    return [["destroy"] + r + ["%s@%s" % (dataset, n)] for n in names]


# zfs and zpool run from the first of these directories that holds them,
# never found through the inherited PATH: sshd's and init's put
# /usr/local/bin (and the like) first, a directory that whoever may write
# there, or a dataset received with mountpoint=/usr/local/bin, would fill
# with a 'zfs' of their own, run as root.
ZFS_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
_ZFS_PROGRAMS = {}      # type: Dict[str, str]   (name: absolute path, found once)


def zfs_program(name: str = "zfs") -> str:
    """The absolute path of name (zfs or zpool) in ZFS_DIRS; ZfsError,
    saying what to do, when none holds it."""
    path = _ZFS_PROGRAMS.get(name)
    if path is not None:
        return path
    for d in ZFS_DIRS:
        path = os.path.join(d, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            _ZFS_PROGRAMS[name] = path
            return path
    raise ZfsError("no %s program in %s: flocker-failover runs zfs and zpool only from "
                   "these directories, never through PATH. Install ZFS (OpenZFS's "
                   "zfsutils, or zfs-fuse for testing); if it is installed elsewhere "
                   "(e.g. /usr/local/sbin), link it into one of them (ln -s "
                   "/usr/local/sbin/%s /usr/sbin/%s)"
                   % (name, " ".join(ZFS_DIRS), name, name))


def program_of(argv: Sequence[str]) -> str:
    """The file to run for argv: zfs and zpool from ZFS_DIRS, any other
    program as named (argv[0] stays 'zfs', as ps shows it)."""
    return zfs_program(argv[0]) if argv[0] in ("zfs", "zpool") else argv[0]


# -- what zfs says it supports, remembered ------------------------------------
#
# The features (above) cost two zfs commands, some 15 ms on zfs-fuse, and a
# new process paid them on each node for every sync (the daemon for every
# cycle).  Their usage text depends only on the zfs program and what its
# dynamic loader maps, so it is remembered: in this process, and in a file
# beside the state file (zfs-usage.json, use_usage_cache), keyed by the
# stat (device, inode, size, mtime, ctime) of the program, of each library
# its loader maps (ldd's list, taken when the text is read) and of
# /etc/ld.so.cache, and by the environment that changes what loads or what
# it prints (_USAGE_ENV).  Installing another zfs replaces the program (a
# new inode and ctime, whatever mtime the copy kept) and runs ldconfig: the
# key no longer matches and the text is read again; so it is when any of
# these files changes, even only its time stamps.  A text read while they
# changed is not kept; a file of another owner, or writable by others, is
# never read.  So the cache can make a process slower, never wrong.

USAGE_CACHE_NAME = "zfs-usage.json"
_USAGE_KEEP = 4             # entries kept in the file (programs x environments)
_USAGE_ENV = ("LD_LIBRARY_PATH", "LD_PRELOAD", "LANG", "LANGUAGE", "LC_ALL",
              "LC_MESSAGES")
_LD_CACHE = "/etc/ld.so.cache"
_USAGE = {"file": None, "memo": None}   # the file; this process's entry


def use_usage_cache(state_db: str) -> None:
    """Keep the zfs usage text in the file beside state_db from now on."""
    _USAGE["file"] = os.path.join(os.path.dirname(state_db) or ".", USAGE_CACHE_NAME)


def _file_stamp(path: str) -> list:
    """What tells a file's content changed, short of reading it."""
    try:
        st = os.stat(path)
    except OSError:
        return [path]
    return [path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _usage_key(program: str, files: Sequence[str]) -> dict:
    return {"program": program, "stamps": [_file_stamp(f) for f in files],
            "env": [[k, os.environ.get(k)] for k in _USAGE_ENV]}


def _usage_entry_current(entry, program: str) -> bool:
    """True when a remembered entry's key still holds: same program and
    environment, each file's stamp unchanged."""
    try:
        files = [s[0] for s in entry["key"]["stamps"]]
        return (files[:1] == [program] and isinstance(entry["text"], str)
                and entry["key"] == _usage_key(program, files))
    except (KeyError, IndexError, TypeError):
        return False


def loaded_libraries(program: str) -> List[str]:
    """The files program's dynamic loader maps (as ldd lists them: glibc's
    LD_TRACE_LOADED_OBJECTS); [] where it does not say (a static program,
    which then just runs: zfs alone prints its usage)."""
    try:
        proc = subprocess.run([os.path.basename(program)], executable=program,
                              env=dict(os.environ, LD_TRACE_LOADED_OBJECTS="1"),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=ZFS_TIMEOUT,
                              universal_newlines=True)
    except (OSError, subprocess.SubprocessError):
        return []
    found = re.findall(r"(/\S+) \(0x[0-9a-f]+\)$", proc.stdout, re.M)
    return sorted(set(f for f in found if os.path.isfile(f)))


def _read_usage_file(path: str) -> list:
    """The entries of the cache file; [] when it is missing, unreadable,
    not this user's own or writable by others."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return []
    with open(fd, encoding="utf-8") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not stat.S_ISREG(st.st_mode):
            return []
        try:
            entries = json.load(f)
        except (ValueError, UnicodeDecodeError, OSError):
            return []
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _write_usage_file(path: str, entry: dict) -> None:
    """Put entry first in the cache file (atomically, mode 0600); another
    entry of the same program and environment goes.  Failing to write only
    costs the next process the two commands."""
    same = (entry["key"]["program"], entry["key"]["env"])
    old = [e for e in _read_usage_file(path)
           if (e.get("key", {}).get("program"), e.get("key", {}).get("env")) != same]
    try:
        fd, tmp = tempfile.mkstemp(prefix=".zfs-usage.", dir=os.path.dirname(path))
    except OSError as e:
        log.debug("cannot keep the zfs usage text in %s: %s", path, e.strerror)
        return
    try:
        with open(fd, "w", encoding="utf-8") as f:
            json.dump([entry] + old[:_USAGE_KEEP - 1], f)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("cannot keep the zfs usage text in %s: %s", path, e.strerror)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def zfs_usage_text() -> str:
    """The usage text of `zfs` and `zfs get` on this host, as
    parse_zfs_features reads it: remembered (see above) or read now."""
    program = zfs_program()
    for entry in [_USAGE["memo"]] + (_read_usage_file(_USAGE["file"])
                                     if _USAGE["file"] else []):
        if entry is not None and _usage_entry_current(entry, program):
            _USAGE["memo"] = entry
            return entry["text"]
    files = [program] + loaded_libraries(program) + [_LD_CACHE]
    key = _usage_key(program, files)
    out = []
    for args in ([], ["get"]):
        proc = subprocess.run(["zfs"] + args, executable=program, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=ZFS_TIMEOUT, universal_newlines=True)
        out.append(proc.stdout + proc.stderr)
    entry = {"key": key, "text": "\n".join(out)}
    if key == _usage_key(program, files):      # nothing changed while it ran
        _USAGE["memo"] = entry
        if _USAGE["file"]:
            _write_usage_file(_USAGE["file"], entry)
    return entry["text"]


# A volume's block device, as OpenZFS names it (udev's 60-zvol.rules on
# Linux, the kernel on FreeBSD).  zfs-fuse makes no volumes at all ('zfs
# create -V': "internal error: Function not implemented").
ZVOL_DIR = "/dev/zvol"
DEVICE_WAIT = 30.0      # seconds a promotion waits for a volume's device


def volume_device(dataset: str) -> str:
    """The device path of volume `dataset` (pure)."""
    return "%s/%s" % (ZVOL_DIR, dataset)


def device_state(path: str) -> str:
    """'missing', 'ro' or 'rw': whether the block device at path exists and
    whether the kernel lets it be written (Linux: /sys/class/block/zdN/ro;
    where that is not there, an existing device counts as 'rw')."""
    try:
        real = os.path.realpath(path)
        if not stat.S_ISBLK(os.stat(real).st_mode):
            return "missing"
    except OSError:
        return "missing"
    try:
        with open("/sys/class/block/%s/ro" % os.path.basename(real)) as f:
            return "ro" if f.read().strip() == "1" else "rw"
    except OSError:
        return "rw"


class ZfsRunning:
    """A zfs command started by Zfs.start(), not yet waited for."""

    def __init__(self, zfs: "Zfs", argv: List[str], proc: subprocess.Popen,
                 started: float) -> None:
        self.zfs, self.argv, self.proc, self.started = zfs, argv, proc, started
        self.done = None   # type: Optional[subprocess.CompletedProcess]

    def wait(self, check: bool = True) -> subprocess.CompletedProcess:
        """Its outcome (ZfsError when it failed and check, or timed out)."""
        if self.done is None:
            try:
                out, err = self.proc.communicate(
                    timeout=max(0.0, self.started + self.zfs.timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
                raise ZfsError("'%s' did not finish within %g s; is the pool hung?"
                               % (" ".join(self.argv), self.zfs.timeout)) from None
            self.done = subprocess.CompletedProcess(self.argv, self.proc.returncode, out, err)
            if self.zfs.timeline is not None:
                self.zfs.timeline.ran(_command_label(self.argv), self.started)
        if check and self.done.returncode != 0:
            raise ZfsError("'%s' failed: %s" % (" ".join(self.argv),
                                                 _stderr_text(self.done.stderr)))
        return self.done


def _command_label(argv: Sequence[str]) -> str:
    """A short name of a zfs command line for a timeline: the sub-command,
    and the property set or the columns read."""
    argv = list(argv)
    return " ".join(argv[:2] + argv[-2:-1] if len(argv) > 3 else argv[:3])


class Zfs(ZfsBase):
    """A thin adapter over the zfs command on this host."""

    def __init__(self, zfs: str = "zfs", timeout: float = ZFS_TIMEOUT,
                 timeline: Optional[Timeline] = None) -> None:
        self.zfs = zfs          # how commands are shown; run from ZFS_DIRS (program_of)
        self.timeout = timeout
        self.timeline = timeline   # each command's end and length is marked there

    # zfs-fuse finishes an unmount after the command returns: a rename or
    # destroy right after it may fail with "dataset is busy" for a moment.
    BUSY_RETRIES = (0.1, 0.2, 0.4, 0.8, 1.5, 3.0, 4.0)

    def run(self, args: Sequence[str], check: bool = True,
            retry_busy: bool = False) -> subprocess.CompletedProcess:
        argv = [self.zfs] + list(args)
        program = program_of(argv)
        started = time.monotonic()
        for pause in self.BUSY_RETRIES + (None,):
            try:
                proc = subprocess.run(argv, executable=program, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      timeout=self.timeout, universal_newlines=True)
            except FileNotFoundError:
                raise ZfsError("the zfs command (%s) was not found; install ZFS "
                               "(OpenZFS, or zfs-fuse for testing)" % program) from None
            except subprocess.TimeoutExpired:
                raise ZfsError("'%s' did not finish within %g s; is the pool hung?"
                               % (" ".join(argv), self.timeout)) from None
            if not (retry_busy and proc.returncode != 0 and zfs_says("busy", proc.stderr)
                    and pause is not None):
                break
            log.warning("'%s': %s; trying again in %g s", " ".join(argv),
                        _stderr_text(proc.stderr), pause)
            time.sleep(pause)
        if self.timeline is not None:
            self.timeline.ran(_command_label(argv), started)
        if check and proc.returncode != 0:
            raise ZfsError("'%s' failed: %s" % (" ".join(argv), _stderr_text(proc.stderr)))
        return proc

    def _usage_text(self) -> str:
        return zfs_usage_text()

    def start(self, args: Sequence[str]) -> "ZfsRunning":
        """Start a zfs command without waiting for it: several run at once
        (a promotion's), each waited for with its wait()."""
        argv = [self.zfs] + list(args)
        try:
            proc = subprocess.Popen(argv, executable=program_of(argv), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    universal_newlines=True)
        except FileNotFoundError:
            raise ZfsError("the zfs command (%s) was not found; install ZFS (OpenZFS, or "
                           "zfs-fuse for testing)" % program_of(argv)) from None
        return ZfsRunning(self, argv, proc, time.monotonic())

    def send_stream_is_empty(self, dataset: str, old: str, new: str) -> bool:
        """Reads at most one byte more than an empty stream has, then closes
        the pipe (zfs send ends on it): the answer never costs the stream's
        size in memory or time.  An error is 'not empty' (the snapshot is
        kept)."""
        argv = [self.zfs, "send", "-i", old, "%s@%s" % (dataset, new)]
        limit = 2 * _DRR_RECORD + 1
        proc = subprocess.Popen(argv, executable=program_of(argv), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        head = b""
        deadline = time.monotonic() + self.timeout
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                while len(head) < limit and time.monotonic() < deadline:
                    if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                        continue
                    chunk = os.read(proc.stdout.fileno(), limit - len(head))
                    if not chunk:
                        break
                    head += chunk
            complete = len(head) < limit and time.monotonic() < deadline
        finally:
            proc.stdout.close()     # a longer stream: its sender ends on the closed pipe
            try:
                status = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                status = proc.wait()
        return complete and status == 0 and stream_is_empty(head)

    def stream_size(self, dataset: str, old: Optional[str], new: str, raw: bool = False) -> int:
        """Bytes of the incremental stream old -> new (old None: the full
        stream of new), 0 when it carries no change (the divergence
        measure; the stream is counted as it is read, never held in
        memory).  raw: the raw stream (zfs send -w) of an encrypted
        dataset, which needs no key."""
        argv = [self.zfs, "send"] + (["-w"] if raw else []) + (["-i", old] if old else []) + \
            ["%s@%s" % (dataset, new)]
        proc = subprocess.Popen(argv, executable=program_of(argv), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        head, total = b"", 0
        buf = bytearray(1 << 20)     # one buffer, read into again and again
        try:
            while True:
                n = proc.stdout.readinto(buf)
                if not n:
                    break
                if len(head) < 4096:
                    head += bytes(buf[:min(n, 4096)])
                total += n
            err = proc.stderr.read().decode("utf-8", "replace")
        finally:
            status = proc.wait()
        if status != 0:
            raise ZfsError("cannot measure the changes %s@%s -> %s: %s%s"
                           % (dataset, old or "(nothing)", new, _stderr_text(err),
                              "; load the key ('zfs load-key %s'), or replicate raw "
                              "(send_flags = -w), which measures without it" % dataset
                              if zfs_says("no_key", err) else ""))
        return 0 if total <= 4096 and stream_is_empty(head) else total

    def settle(self, pool: str) -> bool:
        try:
            proc = subprocess.run(["zpool", "sync", pool], executable=zfs_program("zpool"),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=self.timeout)
        except (ZfsError, FileNotFoundError, subprocess.TimeoutExpired):
            return False
        return proc.returncode == 0

    def exists(self, dataset: str) -> bool:
        proc = self.run(["list", "-H", "-o", "name", dataset], check=False)
        if proc.returncode == 0:
            return True
        if _missing(proc.stderr):
            return False
        raise ZfsError("'zfs list %s' failed: %s" % (dataset, _stderr_text(proc.stderr)))

    def check_works(self, dataset: str) -> None:
        """Raise a clear ZfsError unless zfs runs and the pool is there."""
        pool = dataset.split("/")[0]
        proc = self.run(["list", "-H", "-o", "name", pool], check=False)
        if proc.returncode != 0:
            text = _stderr_text(proc.stderr)
            if _missing(text):
                raise ZfsError("the pool %s of dataset %s does not exist on this "
                               "host ('zpool list' shows the pools there are)"
                               % (pool, dataset))
            raise ZfsError("zfs does not work here: 'zfs list %s' said: %s; is the "
                           "ZFS module (or the zfs-fuse daemon) running?" % (pool, text))

    def create(self, dataset: str) -> None:
        self.run(["create", dataset])

    def is_mounted(self, dataset: str) -> bool:
        return self.get(dataset, ["mounted"]).get("mounted") == "yes"

    def mount(self, dataset: str) -> None:
        if not self.is_mounted(dataset):
            self.run(["mount", dataset], retry_busy=True)

    def unmount(self, dataset: str, known_mounted: bool = False) -> None:
        """known_mounted: a listing just read says it is (no need to ask)."""
        if not known_mounted and not self.is_mounted(dataset):
            return
        proc = self.run(["unmount", dataset], check=False, retry_busy=True)
        if proc.returncode != 0:
            raise ZfsError("cannot unmount %s: %s; a process still uses it: stop_command "
                           "must stop everything that uses the dataset ('fuser -vm "
                           "MOUNTPOINT' shows what)" % (dataset, _stderr_text(proc.stderr)))

    def rename(self, old: str, new: str) -> None:
        self.run(["rename", old, new], retry_busy=True)

    def clone(self, snapshot: str, dataset: str,
              props: Optional[Dict[str, str]] = None) -> None:
        """Clone snapshot as dataset, with props set at creation (zfs clone
        -o; zfs-fuse and OpenZFS both take it).  Should zfs refuse one of
        them, the clone is made without: the caller sets them one by one."""
        opts = [a for p, v in sorted((props or {}).items()) for a in ("-o", "%s=%s" % (p, v))]
        if opts:
            proc = self.run(["clone"] + opts + [snapshot, dataset], check=False)
            if proc.returncode == 0:
                return
            log.warning("'zfs clone -o ...' of %s refused the dataset's own properties "
                        "(%s); cloning without them and setting them one by one",
                        dataset, _stderr_text(proc.stderr))
        self.run(["clone", snapshot, dataset])

    def local_props(self, dataset: str) -> Dict[str, str]:
        """The properties set on the dataset itself (source local, or
        received: OpenZFS), user properties included, as 'zfs set' takes
        them (parsable values)."""
        proc = self.run(["get", "-H", "-p", "-o", "property,value", "-s", "local,received",
                         "all", dataset])
        out = {}
        for line in proc.stdout.splitlines():
            prop, tab, value = line.partition("\t")
            if tab:
                out[prop] = value
        return out

    def descendants(self, dataset: str) -> List[str]:
        """The file systems and volumes below dataset (not itself), parents
        before their children."""
        proc = self.run(["list", "-H", "-o", "name", "-r", "-t", "filesystem,volume",
                         dataset])
        return sorted(n for n in proc.stdout.split("\n") if n.startswith(dataset + "/"))

    def unmount_tree(self, dataset: str, view: Optional[MountView] = None) -> None:
        """Unmount the dataset and every file system below it, the deepest
        first (OpenZFS will not unmount a parent with a child mounted in it).
        view: the tree as a listing just read it, which says what is mounted
        (one command instead of two per file system)."""
        if view is not None:
            # a parent's name is a prefix of its children's: they sort after it
            for name in sorted(view.rows, reverse=True):
                if view.mounted(name):
                    self.unmount(name, known_mounted=True)
            return
        for name in reversed(self.descendants(dataset)):
            self.unmount(name)
        self.unmount(dataset)

    def mount_tree(self, dataset: str) -> List[str]:
        """Mount the dataset, then the file systems below it that mount
        automatically (canmount=on), parents first.  Returns what of the
        latter could not be mounted (with why): the dataset itself must
        mount, or this raises."""
        self.mount(dataset)
        failed = []
        for name in self.descendants(dataset):
            got = self.get(name, ["type", "canmount", "mountpoint"])
            if (got.get("type") != "filesystem" or got.get("canmount") != "on"
                    or got.get("mountpoint") in ("none", "legacy")):
                continue
            try:
                self.mount(name)
            except ZfsError as e:
                failed.append("%s (%s)" % (name, e.message))
        return failed

    def promote_clone(self, dataset: str) -> None:
        self.run(["promote", dataset])

    def key_state(self, dataset: str) -> Optional[Dict[str, str]]:
        """{encryptionroot, keystatus, keylocation} of an encrypted dataset
        (OpenZFS native encryption); None for one that is not encrypted,
        does not exist, or a zfs without encryption (zfs-fuse: nothing is run)."""
        if not self.features().encryption:
            return None
        proc = self.run(["get", "-H", "-p", "-o", "property,value",
                         "encryption,encryptionroot,keystatus,keylocation", dataset],
                        check=False)
        got = dict(line.split("\t", 1) for line in proc.stdout.splitlines() if "\t" in line)
        if proc.returncode != 0 or got.get("encryption", "off") in ("off", "-"):
            return None
        return {"encryptionroot": got.get("encryptionroot", dataset),
                "keystatus": got.get("keystatus", ""),
                "keylocation": got.get("keylocation", "")}

    def load_key(self, root: str, key: Optional[bytes]) -> None:
        """zfs load-key of encryption root `root`: from its keylocation
        (key None), or the key itself on standard input (-L prompt)."""
        argv = [self.zfs, "load-key"] + (["-L", "prompt"] if key is not None else []) + [root]
        try:
            proc = subprocess.run(argv, executable=program_of(argv), input=key or b"",
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise ZfsError("'%s' did not finish within %g s" % (" ".join(argv), self.timeout)
                           ) from None
        if proc.returncode != 0:
            raise ZfsError("'%s' failed: %s" % (" ".join(argv), _stderr_text(
                proc.stderr.decode("utf-8", "replace"))))

    def is_volume(self, dataset: str) -> bool:
        """True when dataset is a volume (a zvol: a block device, no mount)."""
        return self.get(dataset, ["type"]).get("type") == "volume"

    def device_env(self, dataset: str) -> Dict[str, str]:
        """{'FLOCKER_DEVICE': its device path} for a volume, {} for a file
        system or a dataset that does not exist (yet): what the commands of
        the user system get in their environment."""
        try:
            volume = self.exists(dataset) and self.is_volume(dataset)
        except ZfsError:
            return {}
        return {"FLOCKER_DEVICE": volume_device(dataset)} if volume else {}

    def wait_for_device(self, dataset: str, writable: bool,
                        timeout: float = DEVICE_WAIT) -> Optional[str]:
        """Wait until the volume's device exists (and, when writable, the
        kernel lets it be written: readonly=off reaches the device a moment
        after 'zfs set'); returns its path, or None when volmode=none
        (the operator chose no device).  ZfsError, saying what to look at,
        when it does not come within timeout."""
        if self.get(dataset, ["volmode"]).get("volmode") == "none":
            return None
        path = volume_device(dataset)
        deadline = time.monotonic() + timeout
        while True:
            state = device_state(path)
            if state == "rw" or (state == "ro" and not writable):
                return path
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        raise ZfsError(
            "the device %s of volume %s %s within %g s; nothing else was changed. "
            "It is made by udev (OpenZFS's rule 60-zvol.rules, 'udevadm settle' waits "
            "for it): is udev running, and is the volume's volmode 'default' or 'full' "
            "('zfs get volmode %s')?"
            % (path, dataset, "did not appear" if state == "missing"
               else "stayed read-only", timeout, dataset))

    def send_estimate(self, send_argv: Sequence[str]) -> Optional[int]:
        """The size of the stream send_argv ('zfs send ...') would make, by
        'zfs send -n -P' (a dry run); None when zfs cannot tell."""
        proc = self.run(["send", "-n", "-P"] + list(send_argv[2:]), check=False)
        for line in reversed(proc.stdout.splitlines() if proc.returncode == 0 else []):
            parts = line.split()
            if len(parts) == 2 and parts[0] == "size" and parts[1].isdigit():
                return int(parts[1])
        return None

    def clones_of(self, dataset: str) -> List[str]:
        """The datasets cloned from a snapshot of dataset (read from every
        dataset's origin in the pool: zfs-fuse has no 'clones' property)."""
        proc = self.run(["get", "-H", "-o", "name,value", "-r", "origin",
                         dataset.split("/", 1)[0]])
        out = []
        for line in proc.stdout.splitlines():
            name, _, origin = line.partition("\t")
            if "@" not in name and origin.split("@", 1)[0] == dataset:
                out.append(name)
        return out

    def origin(self, dataset: str) -> str:
        """The snapshot a clone was made from, or '' for a plain dataset."""
        value = self.get(dataset, ["origin"]).get("origin", "-")
        return "" if value == "-" else value

    def get(self, dataset: str, props: Sequence[str]) -> Dict[str, str]:
        """Parsed 'zfs get -H -p' values of one dataset."""
        proc = self.run(["get", "-H", "-p", "-o", "property,value", ",".join(props),
                         dataset])
        out = {}
        for line in proc.stdout.splitlines():
            prop, _, value = line.partition("\t")
            out[prop] = value
        return out


_DRR_RECORD = 312            # sizeof(dmu_replay_record_t), every stream version
_DRR_BEGIN, _DRR_END = 0, 5


def stream_is_empty(stream: bytes) -> bool:
    """True for a send stream of exactly a BEGIN and an END record, which
    is what `zfs send -i A B` gives when B holds nothing A does not (pure).
    A raw stream's (-w) BEGIN record is followed by its payload, the key
    parameters (OpenZFS 2.3.2: 1028 bytes, 1652 in all); a plain one has
    none (624 bytes in all)."""
    for order in ("little", "big"):     # (the sending host's byte order)
        if len(stream) < 2 * _DRR_RECORD or int.from_bytes(stream[0:4], order) != _DRR_BEGIN:
            continue
        end = _DRR_RECORD + int.from_bytes(stream[4:8], order)
        if len(stream) == end + _DRR_RECORD and \
                int.from_bytes(stream[end:end + 4], order) == _DRR_END:
            return True
    return False


# The first record of every stream is a BEGIN record, written in the byte
# order of the sending host (zfs recv tells it by the magic and swaps):
#
#   offset  size  field
#        0     4  drr_type              0 (DRR_BEGIN)
#        4     4  drr_payloadlen        bytes that follow the record
#        8     8  drr_magic             0x2f5bacbac (DMU_BACKUP_MAGIC)
#       16     8  drr_versioninfo       bits 0-1: header type, 1 a plain stream
#                                       (one snapshot), 2 a compound stream of
#                                       plain streams; bits 2-31: feature flags
#       24   288  creation time, type, flags, GUIDs, snapshot name
#
# Properties travel only in the payload of a compound stream's BEGIN record
# (a packed list of the datasets sent, with their properties and
# snapshots): 'send -p' and '-R' write one; 'send -I' writes a compound
# stream with no payload, the snapshots of one dataset in a row.
DMU_BACKUP_MAGIC = 0x2F5BACBAC
DMU_SUBSTREAM, DMU_COMPOUNDSTREAM = 1, 2


_F_SETPIPE_SZ = 1031   # fcntl.F_SETPIPE_SZ, named only from Python 3.10


def _stream_order(head: bytes) -> str:
    """The byte order of a stream whose first record is head ('little',
    'big'), or '' when head is no zfs send stream's BEGIN record (pure)."""
    if len(head) < _DRR_RECORD:
        return ""
    for order in ("little", "big"):
        if int.from_bytes(head[8:16], order) == DMU_BACKUP_MAGIC:
            return order if int.from_bytes(head[0:4], order) == _DRR_BEGIN else ""
    return ""


def stream_is_package(head: bytes) -> bool:
    """True when the stream whose first record is head is a package stream
    ('send -R', '-p': a compound stream whose BEGIN record carries the
    datasets and their properties), the only kind that carries properties
    (a raw plain stream's BEGIN carries its key parameters, no property)
    (pure)."""
    order = _stream_order(head)
    return bool(order) and (int.from_bytes(head[16:24], order) & 3 == DMU_COMPOUNDSTREAM
                            and int.from_bytes(head[4:8], order) != 0)


def stream_refusal(head: bytes, recursive: bool) -> str:
    """Why the gate does not receive a stream whose first bytes (its first
    record, _DRR_RECORD bytes when the stream has that many) are head, or
    '' when it may (pure).  A package stream (compound, with a payload) is
    taken only with recursive = yes: with recursive = no replication sends
    plain streams ('send -i', '-I'), which carry no property and no other
    dataset."""
    if len(head) < _DRR_RECORD:
        return ("the stream ended after %d bytes, before its first record (%d bytes) "
                "was complete: not a zfs send stream" % (len(head), _DRR_RECORD))
    order = _stream_order(head)
    if not order:
        return ("the stream does not begin with the BEGIN record of a zfs send stream "
                "(magic 0x%x): not a zfs send stream" % DMU_BACKUP_MAGIC)
    kind = int.from_bytes(head[16:24], order) & 3
    if kind == DMU_COMPOUNDSTREAM:
        if recursive or not stream_is_package(head):
            return ""
        return ("the stream is a package stream ('zfs send -R' or '-p': it carries "
                "properties, and with -R child datasets), which this node takes only "
                "with recursive = yes; it has recursive = no, and its replication sends "
                "plain streams ([cluster] recursive must be the same on both nodes)")
    if kind != DMU_SUBSTREAM:
        return ("the stream's header type %d is neither %d (a plain stream) nor %d "
                "(a package stream): not a zfs send stream this gate knows"
                % (kind, DMU_SUBSTREAM, DMU_COMPOUNDSTREAM))
    return ""


# -- the ssh gate: what the peer may ask of this node -------------------------
#
# The peer's key in root's authorized_keys carries a forced command:
#
#   restrict,command="/usr/local/sbin/flocker_failover.py --config
#   /etc/flocker/flocker.conf ssh-gate" ssh-ed25519 AAAA... flocker@alpha
#
# sshd then runs the gate instead of whatever was asked, with the request in
# SSH_ORIGINAL_COMMAND.  No shell ever reads the request.  The gate refuses
# any character outside letters, digits, space and _ . : / @ = , ' - (so
# ; | & $ ` < > ( ) \ " * ? newlines and the like never get in), splits
# what is left into words as a shell would (shlex: single quotes group
# words), and runs it only when it is exactly one of these forms, where D is
# the dataset of the node the gate runs on ([node NAME] dataset):
#
#   features                          usage text of `zfs` and of `zfs get`
#   session                           many requests on one connection (below)
#   zfs get -H -p -o FIELDS PROPS [-d 1 | -r] D
#       FIELDS: name,property,value | property,value | value
#       PROPS: any of guid userrefs readonly flocker:role flocker:divergence
#              written createtxg
#              receive_resume_token, comma-separated
#   zfs list -H -o name D             D or one of its parents (the pool too)
#   zfs recv -u [-s] D                the stream comes on standard input; not
#                                     a package stream ('send -R', '-p') unless
#                                     recursive = yes (stream_refusal)
#   zfs recv -A D                     drop a partial resumable receive
#   zfs recv -A D/CHILD               ... of a dataset below D (a package
#                                     stream cut inside that child)
#   zfs hold [-r] flocker D@SNAP      only the tag flocker
#   zfs release [-r] flocker D@SNAP
#   zfs destroy [-r] D@F[,F...]       F: flocker replication snapshots only
#                                     (flocker-<epoch>-<UTC time>Z[-N])
#   zfs set readonly=on D
#   zfs set 'flocker:role=NODE ROLE EPOCH' D
#   flocker status --json             this node's status (the place for the
#                                     switchover requests to come)
#
# -r and D/CHILD only where recursive = yes.  Anything else is refused: exit status
# EXIT_REFUSED and one line on standard error for the ssh client, and the
# same reason logged on this host (syslog).
#
# session: the gate writes "flocker-gate 1 NODE\n", then reads requests, one
# per line (the same forms, except session and zfs recv -u, whose stream
# needs a connection of its own), and answers each with "RC NOUT NERR\n"
# followed by NOUT bytes of the command's standard output and NERR bytes of
# its standard error.  It ends at end of input, or after ssh_control_persist
# seconds without a request.  Replication keeps one session open per peer,
# so a short request costs one round trip on the open connection: no new
# ssh channel and no new Python process (the gate takes ~0.1 s to start).

GATE_PROTOCOL = 1
GATE_BANNER = "flocker-gate"
GATE_MAX_REQUEST = 4096
_GATE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                        "0123456789 _.:/@=,'-")
_GATE_FIELDS = ("name,property,value", "property,value", "value")
_GATE_PROPS = ("guid", "userrefs", "readonly", ROLE_PROPERTY, DIVERGENCE_PROPERTY,
               "written", "createtxg", "receive_resume_token", "clones")
_GATE_SNAP_RE = re.compile(r"^[A-Za-z0-9_.: -]+$")   # what zfs allows after '@'
GATE_REQUESTS = ("features, session, zfs get|list|recv|hold|release|destroy|set "
                 "(on this node's dataset), flocker status --json")


class GateRefused(Exception):
    """A request the ssh gate does not run; reason says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@record
class GateRequest:
    kind: str                  # features, session, zfs, flocker
    args: Tuple[str, ...]      # the zfs or flocker-failover arguments
    stream: bool = False       # standard input carries a zfs send stream


def parse_gate_request(text: str, dataset: str, recursive: bool,
                       nodes: Sequence[str]) -> GateRequest:
    """The request text (SSH_ORIGINAL_COMMAND, or one line of a session)
    as a GateRequest, or GateRefused with the reason (pure)."""
    if not text.strip():
        raise GateRefused("no request: this key gets no login shell, only the "
                          "requests of flocker-failover's ssh gate")
    if len(text) > GATE_MAX_REQUEST:
        raise GateRefused("the request is %d bytes long, more than %d"
                          % (len(text), GATE_MAX_REQUEST))
    bad = sorted(set(text) - _GATE_CHARS)
    if bad:
        raise GateRefused("the request contains %s: no shell runs here, and shell "
                          "syntax (; | & $ ` < > ( ) quotes, newlines) is never accepted"
                          % " ".join(repr(c) for c in bad))
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise GateRefused("the request cannot be split into words (%s)" % e) from None
    if not words:
        raise GateRefused("no request: only quotes")
    op, args = words[0], words[1:]
    if op in ("features", "session"):
        if args:
            raise GateRefused("%s takes no arguments" % op)
        return GateRequest(op, ())
    if op == "flocker":
        if args == ["status", "--json"]:
            return GateRequest("flocker", ("status", "--json"))
        raise GateRefused("'flocker %s': the only flocker-failover command the gate "
                          "runs is 'flocker status --json'" % " ".join(args))
    if op != "zfs":
        raise GateRefused("%r is not a request of the gate, which accepts only: %s"
                          % (op, GATE_REQUESTS))
    if not args:
        raise GateRefused("'zfs' needs one of get, list, recv, hold, release, "
                          "destroy, set")
    check = _GATE_ZFS.get(args[0])
    if check is None:
        raise GateRefused("zfs %s is not allowed through the gate (only get, list, "
                          "recv, hold, release, destroy, set)" % args[0])
    return check(args[1:], dataset, recursive, nodes)


def _gate_own(name: str, dataset: str) -> None:
    if name != dataset:
        raise GateRefused("%s is not %s, the dataset of this node" % (name, dataset))


def _gate_recursive(args: List[str], sub: str, recursive: bool) -> List[str]:
    if args[:1] != ["-r"]:
        return args
    if not recursive:
        raise GateRefused("zfs %s -r: -r (child datasets too) is allowed only with "
                          "recursive = yes" % sub)
    return args[1:]


def _gate_snapshot(name: str, dataset: str, sub: str) -> Tuple[str, str]:
    ds, at, snap = name.partition("@")
    if not at:
        raise GateRefused("zfs %s %s: only snapshots (%s@NAME) are allowed"
                          % (sub, name, dataset))
    _gate_own(ds, dataset)
    return ds, snap


def _gate_zfs_get(args, dataset, recursive, nodes) -> GateRequest:
    form = ("'zfs get -H -p -o FIELDS PROPERTIES [-d 1%s] %s' with FIELDS one of %s and "
            "PROPERTIES among %s" % (" | -r" if recursive else "", dataset,
                                     " ".join(_GATE_FIELDS), ",".join(_GATE_PROPS)))
    if len(args) == 7 and args[5] == "-r" and not recursive:
        raise GateRefused("zfs get -r: -r (child datasets too) is allowed only with "
                          "recursive = yes")
    if len(args) not in (6, 7, 8) or args[:3] != ["-H", "-p", "-o"] or (
            len(args) == 8 and args[5:7] != ["-d", "1"]) or (
            len(args) == 7 and args[5] != "-r"):
        raise GateRefused("zfs get: only the form %s" % form)
    if args[3] not in _GATE_FIELDS or not all(
            p in _GATE_PROPS for p in args[4].split(",")):
        raise GateRefused("zfs get %s %s: only the form %s" % (args[3], args[4], form))
    _gate_own(args[-1], dataset)
    return GateRequest("zfs", ("get",) + tuple(args))


def _gate_zfs_list(args, dataset, recursive, nodes) -> GateRequest:
    if len(args) != 4 or args[:3] != ["-H", "-o", "name"] or not (
            args[3] == dataset or dataset.startswith(args[3] + "/")):
        raise GateRefused("zfs list: only 'zfs list -H -o name NAME' of %s or one "
                          "of its parents" % dataset)
    return GateRequest("zfs", ("list",) + tuple(args))


_GATE_CHILD_RE = re.compile(r"^(/[A-Za-z0-9_.:-]+)+$")   # below D: /kid, /kid/grandkid


def _gate_zfs_recv(args, dataset, recursive, nodes) -> GateRequest:
    if args in (["-u", dataset], ["-u", "-s", dataset]):
        return GateRequest("zfs", ("recv",) + tuple(args), stream=True)
    if args == ["-A", dataset]:
        return GateRequest("zfs", ("recv",) + tuple(args))
    if len(args) == 2 and args[0] == "-A" and args[1].startswith(dataset + "/"):
        # a child's partial receive (a package stream cut in that child)
        if not recursive:
            raise GateRefused("zfs recv -A %s: a child dataset's partial receive is "
                              "dropped through the gate only with recursive = yes" % args[1])
        if not _GATE_CHILD_RE.match(args[1][len(dataset):]):
            raise GateRefused("zfs recv -A %s: not a dataset below %s" % (args[1], dataset))
        return GateRequest("zfs", ("recv",) + tuple(args))
    if args and args[-1] != dataset:
        _gate_own(args[-1], dataset)
    raise GateRefused("zfs recv %s: only 'zfs recv -u [-s] %s' and 'zfs recv -A %s%s' "
                      "(never -F, which rolls back and destroys)"
                      % (" ".join(args), dataset, dataset, "[/CHILD]" if recursive else ""))


def _gate_zfs_hold(args, dataset, recursive, nodes, sub="hold") -> GateRequest:
    rest = _gate_recursive(args, sub, recursive)
    if len(rest) != 2 or rest[0] != HOLD_TAG:
        raise GateRefused("zfs %s: only 'zfs %s [-r] %s %s@SNAPSHOT'"
                          % (sub, sub, HOLD_TAG, dataset))
    _, snap = _gate_snapshot(rest[1], dataset, sub)
    if not _GATE_SNAP_RE.match(snap):
        raise GateRefused("zfs %s: %r is not a snapshot name" % (sub, snap))
    return GateRequest("zfs", (sub,) + tuple(args))


def _gate_zfs_release(args, dataset, recursive, nodes) -> GateRequest:
    return _gate_zfs_hold(args, dataset, recursive, nodes, sub="release")


def _gate_zfs_destroy(args, dataset, recursive, nodes) -> GateRequest:
    sub = "destroy"
    rest = _gate_recursive(args, sub, recursive)
    if len(rest) != 1 or rest[0].startswith("-"):
        raise GateRefused("zfs %s %s: only 'zfs %s%s %s@SNAPSHOT[,...]' with no other "
                          "option" % (sub, " ".join(args), sub,
                                      " [-r]" if recursive else "", dataset))
    if "@" not in rest[0]:
        raise GateRefused("zfs %s %s: a dataset is never destroyed through the gate, "
                          "only flocker replication snapshots of %s"
                          % (sub, rest[0], dataset))
    _, snaps = _gate_snapshot(rest[0], dataset, sub)
    for snap in snaps.split(","):
        if not _SNAPSHOT_RE.match(snap):
            raise GateRefused("zfs %s %s@%s: not a flocker replication snapshot "
                              "(flocker-<epoch>-<UTC time>Z); no other snapshot is "
                              "destroyed through the gate" % (sub, dataset, snap))
    return GateRequest("zfs", (sub,) + tuple(args))


def _gate_zfs_set(args, dataset, recursive, nodes) -> GateRequest:
    form = ("only 'zfs set readonly=on %s' and \"zfs set 'flocker:role=NODE ROLE "
            "EPOCH' %s\"" % (dataset, dataset))
    if len(args) != 2:
        raise GateRefused("zfs set: %s" % form)
    _gate_own(args[1], dataset)
    prop, _, value = args[0].partition("=")
    words = value.split(" ")
    if args[0] == "readonly=on" or (
            prop == ROLE_PROPERTY and len(words) == 3 and words[0] in nodes
            and words[1] in ROLES and words[2].isdigit()):
        return GateRequest("zfs", ("set",) + tuple(args))
    raise GateRefused("zfs set %s: %s" % (args[0], form))


_GATE_ZFS = dict(get=_gate_zfs_get, list=_gate_zfs_list, recv=_gate_zfs_recv,
                 hold=_gate_zfs_hold, release=_gate_zfs_release,
                 destroy=_gate_zfs_destroy, set=_gate_zfs_set)


def gate_features_text() -> bytes:
    """What the features request prints: the usage text of `zfs` and of
    `zfs get` (the property table), as parse_zfs_features reads it."""
    return zfs_usage_text().encode("utf-8", "surrogateescape")


# what the gate refuses when its own node is master: the peer never writes
# into a live dataset (a peer that took itself for master in the middle of a
# cycle, or on the other side of a one-way link loss, is stopped here)
# (spelt as one string: this is no site that destroys, see test_replication)
GATE_MASTER_REFUSES = tuple("recv set destroy hold release".split())


class Gate:
    """The gate serving one ssh connection of the peer on this node."""

    def __init__(self, cfg: Config, program: str, logged: bool = True,
                 client: Optional[str] = None) -> None:
        self.cfg = cfg
        self.program = program      # this file, for the flocker requests
        self.logged = logged        # False: no syslog here, refusals go to the client only
        self.client = client or (os.environ.get("SSH_CLIENT", "").split() or ["?"])[0]

    def parse(self, text: str) -> GateRequest:
        req = parse_gate_request(text, self.cfg.local.dataset, self.cfg.recursive,
                                 [n.name for n in self.cfg.nodes])
        if req.kind == "zfs" and req.args[:1] and req.args[0] in GATE_MASTER_REFUSES:
            epoch = self._master_epoch()
            if epoch is not None:
                raise GateRefused(
                    "node %s is master here (epoch %d): it takes no '%s' from its peer. "
                    "Only a slave's replica is written by the peer; if %s should be "
                    "slave, its daemon demotes it (see 'status' on both nodes)"
                    % (self.cfg.local.name, epoch, req.args[0], self.cfg.local.name))
        return req

    def _master_epoch(self) -> Optional[int]:
        """This node's epoch when its state file says it is master, else None
        (no state file yet: a slave being filled for the first time)."""
        try:
            with StateStore.open(self.cfg.local.state_db, readonly=True) as store:
                st = store.node_state()
        except StateError as e:
            if not os.path.exists(self.cfg.local.state_db):
                return None
            raise GateRefused("cannot read this node's role from %s: %s"
                              % (self.cfg.local.state_db, e.message)) from None
        return st.epoch if st is not None and st.role == ROLE_MASTER else None

    def refusal(self, text: str, reason: str) -> str:
        """Log a refusal here; return the line for the ssh client."""
        shown = text if len(text) <= 300 else text[:300] + "..."
        log.warning("ssh-gate: refused %r from %s: %s", shown, self.client, reason)
        return ("%s ssh-gate on %s: refused: %s. This key may only make the requests of "
                "flocker-failover's ssh gate (README: \"The ssh gate\")%s\n"
                % (PROG, self.cfg.local.name, reason,
                   "" if self.logged else "; not logged on %s: no syslog socket there"
                   % self.cfg.local.name))

    def argv(self, req: GateRequest) -> List[str]:
        if req.kind == "zfs":
            return ["zfs"] + list(req.args)
        return [sys.executable, self.program, "--config", self.cfg.path,
                "--node", self.cfg.local.name] + list(req.args)

    def serve(self, text: str) -> int:
        """One request from SSH_ORIGINAL_COMMAND; returns the exit status
        (a zfs or flocker request replaces this process)."""
        try:
            req = self.parse(text)
        except GateRefused as e:
            sys.stderr.write(self.refusal(text, e.reason))
            return EXIT_REFUSED
        log.info("ssh-gate: %s from %s", text, self.client)
        if req.kind == "session":
            return self.session(sys.stdin.fileno(), sys.stdout.fileno())
        if req.stream:
            return self.receive(req, text)
        if req.kind == "features":
            sys.stdout.buffer.write(gate_features_text())
            sys.stdout.flush()
            return EXIT_OK
        return self._become(self.argv(req))

    def _become(self, argv: List[str]) -> int:
        """Replace this process with argv (its stream, signals and exit
        status are the request's own); 127 when it cannot run."""
        program = program_of(argv)
        logging.shutdown()
        try:
            os.execv(program, argv)
        except OSError as e:
            sys.stderr.write("%s ssh-gate on %s: cannot run %s: %s\n"
                             % (PROG, self.cfg.local.name, argv[0], e.strerror))
            return 127

    def receive(self, req: GateRequest, text: str) -> int:
        """zfs recv of the peer's stream.  The gate reads the stream's first
        record itself and refuses what is not a zfs send stream, and a
        package stream ('send -R', '-p') unless recursive = yes, before
        anything is received (stream_refusal).  Then zfs recv gets that
        record and the rest of the stream through a pipe from the gate,
        which passes on zfs recv's exit status.  A stream carries properties
        that receive applies: none of RECV_GUARDED may change here, since
        they decide where the replica mounts, whether, and what may run
        from it.  Where zfs takes 'recv -x' (OpenZFS) they are excluded.
        Otherwise (zfs-fuse) a watcher process notes them first and, the
        moment zfs recv ends (its end of a pipe closes), puts back what the
        stream changed (the replica is received unmounted: -u) and logs it."""
        head = _read_up_to(0, _DRR_RECORD)
        reason = stream_refusal(head, self.cfg.recursive)
        if reason:
            sys.stderr.write(self.refusal(text, reason))
            return EXIT_REFUSED
        usage = gate_features_text().decode("utf-8", "replace")
        args, guarded = gate_recv_args(req.args, usage, stream_is_package(head))
        held = []       # the watcher's pipe, held by zfs recv only
        if guarded and not parse_zfs_features(usage).recv_exclude:
            held.append(self._watch_receive(guarded))
        return self._feed(["zfs"] + args, head, held)

    def _feed(self, argv: List[str], head: bytes, held: List[int]) -> int:
        """Run argv with head, then the rest of this process's standard
        input, as its standard input; its exit status (128 + N when signal N
        ended it).  The bytes move between pipes in the kernel (os.splice,
        Python 3.10 on) or in chunks of GATE_CHUNK."""
        rfd, wfd = os.pipe()
        for fd in (0, wfd):
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, _F_SETPIPE_SZ, GATE_CHUNK)
        try:
            proc = subprocess.Popen(argv, executable=zfs_program(), stdin=rfd,
                                    pass_fds=held)
        except OSError as e:
            os.close(wfd)
            sys.stderr.write("%s ssh-gate on %s: cannot run %s: %s\n"
                             % (PROG, self.cfg.local.name, argv[0], e.strerror))
            return 127
        finally:
            for fd in [rfd] + held:
                os.close(fd)
        try:
            _write_fully(wfd, head)
            _copy_stream(0, wfd)
        except BrokenPipeError:
            pass            # zfs recv ended before the stream did: its status says why
        finally:
            os.close(wfd)
        status = proc.wait()
        return status if status >= 0 else 128 - status

    def _watch_receive(self, guarded: List[str]) -> int:
        """Start the watcher; returns the write end of its pipe (the
        watcher acts when every copy of it is closed)."""
        ds = self.cfg.local.dataset
        before = _guarded_state(ds, list(guarded) + ["mounted"])
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:      # the watcher: away from the ssh session's pipes
            try:
                os.close(wfd)
                os.setsid()
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                while os.read(rfd, 1):
                    pass          # (nothing is written: EOF when zfs recv ended)
                _restore_guarded(ds, guarded, before, self.client)
            except BaseException:   # pragma: no cover - logged, never raised
                log.exception("ssh-gate: checking the received properties of %s failed", ds)
            finally:
                logging.shutdown()
                os._exit(0)
        os.close(rfd)
        return wfd

    def answer(self, text: str) -> Tuple[int, bytes, bytes]:
        """One request of a session: (exit status, stdout, stderr)."""
        try:
            req = self.parse(text)
            if req.kind == "session" or req.stream:
                raise GateRefused("%s is not taken within a session; it needs a "
                                  "connection of its own" % text)
        except GateRefused as e:
            return EXIT_REFUSED, b"", self.refusal(text, e.reason).encode()
        log.debug("ssh-gate: %s from %s (session)", text, self.client)
        if req.kind == "features":
            return EXIT_OK, gate_features_text(), b""
        argv = self.argv(req)
        try:
            proc = subprocess.run(argv, executable=program_of(argv), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  timeout=ZFS_TIMEOUT)
        except FileNotFoundError:
            return 127, b"", ("%s: command not found on %s\n"
                              % (argv[0], self.cfg.local.name)).encode()
        except subprocess.TimeoutExpired:
            return 124, b"", ("'%s' did not finish within %g s on %s; is the pool hung?\n"
                              % (" ".join(argv), ZFS_TIMEOUT, self.cfg.local.name)).encode()
        return proc.returncode, proc.stdout, proc.stderr

    def session(self, rfd: int, wfd: int) -> int:
        idle = max(1.0, self.cfg.ssh_control_persist)
        sel = selectors.DefaultSelector()
        sel.register(rfd, selectors.EVENT_READ)
        buf = b""
        try:
            _write_fully(wfd, ("%s %d %s\n" % (GATE_BANNER, GATE_PROTOCOL,
                                               self.cfg.local.name)).encode())
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > GATE_MAX_REQUEST:
                        text = buf[:300].decode("utf-8", "replace")
                        _write_fully(wfd, _gate_frame(EXIT_REFUSED, b"", self.refusal(
                            text, "a request line longer than %d bytes; the session ends"
                            % GATE_MAX_REQUEST).encode()))
                        return EXIT_REFUSED
                    if not sel.select(timeout=idle):
                        log.debug("ssh-gate: session idle for %g s, ending it", idle)
                        return EXIT_OK
                    chunk = os.read(rfd, 65536)
                    if not chunk:
                        return EXIT_OK
                    buf += chunk
                    continue
                line, buf = buf[:nl], buf[nl + 1:]
                rc, out, err = self.answer(line.decode("utf-8", "replace"))
                _write_fully(wfd, _gate_frame(rc, out, err))
        except (BrokenPipeError, ConnectionResetError):
            return EXIT_OK      # the client went away
        finally:
            sel.close()


# Properties a received stream must never set on this node: where the
# replica mounts and whether, whether it is writable, what may run from it,
# what is shared from it.
RECV_GUARDED = ("mountpoint", "canmount", "readonly", "exec", "setuid", "devices",
                "sharenfs", "sharesmb", "zoned", "overlay")


def gate_recv_args(args: Sequence[str], usage: str, package: bool
                   ) -> Tuple[List[str], List[str]]:
    """The zfs arguments of the gate's receive ('recv -u [-s] DS' with
    '-x P' for each guarded property where this zfs takes -x) and the
    guarded properties this zfs knows (pure).  Only a package stream
    (stream_is_package) carries properties: a plain one gets neither -x nor
    a watcher, which it does not need.  Into a volume, OpenZFS 2.3.2 warns
    for each -x of a property a volume lacks ("Warning: ...: property
    'mountpoint' does not apply to datasets of this type") and OpenZFS 0.7
    and 0.8 refused the receive (openzfs/zfs#6371, #11416)."""
    if not package:
        return list(args), []
    guarded = [p for p in RECV_GUARDED if p in zfs_properties(usage)]
    args = list(args)
    if parse_zfs_features(usage).recv_exclude:
        args = args[:1] + [a for p in guarded for a in ("-x", p)] + args[1:]
    return args, guarded


def _zfs_quiet(args: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["zfs"] + args, executable=zfs_program(), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=ZFS_TIMEOUT)


def _guarded_state(ds: str, props: Sequence[str]) -> Dict[str, Dict[str, Tuple[str, str]]]:
    """{dataset: {property: (value, source)}} of ds and the datasets below
    it ({} when ds does not exist yet)."""
    if not props:
        return {}
    proc = _zfs_quiet(["get", "-H", "-r", "-o", "name,property,value,source",
                       ",".join(props), ds])
    out = {}    # type: Dict[str, Dict[str, Tuple[str, str]]]
    for line in proc.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 4 and "@" not in parts[0]:
            out.setdefault(parts[0], {})[parts[1]] = (parts[2], parts[3])
    return out


_SHARING = ("sharenfs", "sharesmb")


def _restore_guarded(ds: str, props: Sequence[str], before, client: str) -> str:
    """Put back every guarded property a receive changed on ds or below:
    a value set here before ('local') that the stream cleared is set again;
    one the stream set (source 'received') is inherited, as it was; a value
    set here now is never touched (the master's 'set readonly=on' may come
    meanwhile); canmount, which is not
    inherited, is set to its value before, else on.  zfs-fuse mounts a
    dataset to share it whenever a change leaves sharenfs or sharesmb on,
    and when canmount is set on: so first nothing the stream shared stays
    shared (set off meanwhile); then, parents before their children (a
    child's value follows its parent's), where they mount, the rest,
    sharing, and canmount last; and whatever is mounted afterwards that
    was not before (before['mounted']) is unmounted.  Returns '' or what
    could not be put back."""
    props = list(props)
    now = _guarded_state(ds, props)
    names = sorted(now)             # parents before their children
    for name in reversed(names):
        for prop in _SHARING:
            if now[name].get(prop, ("", ""))[1] == "received":
                _zfs_quiet(["set", prop + "=off", name])
    order = ([p for p in props if p == "mountpoint"]
             + [p for p in props if p not in _SHARING + ("mountpoint", "canmount")]
             + [p for p in props if p in _SHARING] + [p for p in props if p == "canmount"])
    failed = []
    for prop in order:
        for name in names:
            if prop in now[name]:
                problem = _put_back(name, prop, now[name][prop],
                                    before.get(name, {}).get(prop), client)
                if problem:
                    failed.append(problem)
    for name, state in sorted(_guarded_state(ds, ["mounted"]).items(), reverse=True):
        if state["mounted"][0] == "yes" and before.get(name, {}).get(
                "mounted", ("no", ""))[0] != "yes":
            proc = _zfs_quiet(["unmount", name])
            log.log(logging.WARNING if proc.returncode == 0 else logging.ERROR,
                    "ssh-gate: %s was mounted after the stream from %s; %s", name, client,
                    "unmounted" if proc.returncode == 0 else "COULD NOT unmount it: "
                    + _stderr_text(proc.stderr))
            if proc.returncode != 0:
                failed.append("%s mounted" % name)
    if failed:
        return ("the received stream set properties that could not be put back: %s; "
                "set them on this node by hand before mounting the replica"
                % ", ".join(failed))
    return ""


def _prop_state(name: str, prop: str) -> Tuple[str, str]:
    """(value, source) of prop on name; ('', '') when it cannot be read."""
    parts = _zfs_quiet(["get", "-H", "-o", "value,source", prop, name]).stdout.split("\t")
    return (parts[0], parts[1].rstrip("\n")) if len(parts) == 2 else ("", "")


def _put_back(name: str, prop: str, now: Tuple[str, str],
              old: Optional[Tuple[str, str]], client: str) -> str:
    """Put back prop on name as it was: now is (value, source) as the
    receive left it, old as it was before (None for a dataset the receive
    made).  '' or what could not be put back."""
    value, source = now
    if source == "local":
        return ""       # set here (meanwhile too: the master's 'set readonly=on')
    if old is not None and old[1] == "local":
        cmd = ["set", "%s=%s" % (prop, old[0]), name]     # the stream cleared it
    elif source != "received":
        return ""
    elif prop == "canmount":
        cmd = ["set", "canmount=" + (old[0] if old else "on"), name]
    elif old is None:
        # zfs-fuse keeps the received value of a dataset the receive made
        # through 'zfs inherit': set the value it would inherit
        parent, _, last = name.rpartition("/")
        inherited = _prop_state(parent, prop)[0]
        if prop == "mountpoint" and inherited.startswith("/"):
            inherited = os.path.join(inherited, last)
        cmd = ["set", "%s=%s" % (prop, inherited), name]
    else:
        cmd = ["inherit", prop, name]
    proc = _zfs_quiet(cmd)       # (zfs-fuse may fail to share, yet do it)
    after = _prop_state(name, prop)
    done = after[1] != "received" and (cmd[0] != "set" or after[0] == cmd[1].split("=", 1)[1])
    log.log(logging.WARNING if done else logging.ERROR,
            "ssh-gate: the stream from %s set %s=%s on %s; %s ('zfs %s')",
            client, prop, value, name,
            "put back" if done else "COULD NOT put it back: " + _stderr_text(proc.stderr),
            " ".join(cmd))
    return "" if done else "%s %s=%s" % (name, prop, value)


GATE_CHUNK = 1 << 20     # bytes the gate moves at a time from the peer to zfs recv


def _read_up_to(fd: int, n: int) -> bytes:
    """The first n bytes read from fd, fewer only at its end."""
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _copy_stream(src: int, dst: int) -> None:
    """Everything from src to dst (a pipe) until src ends."""
    splice = getattr(os, "splice", None)        # Python 3.10 on
    while splice is not None:
        try:
            if not splice(src, dst, GATE_CHUNK):
                return
        except OSError as e:
            if e.errno != errno.EINVAL:         # (EINVAL: src cannot be spliced)
                raise
            splice = None
    while True:
        chunk = os.read(src, GATE_CHUNK)
        if not chunk:
            return
        _write_fully(dst, chunk)


def _gate_frame(rc: int, out: bytes, err: bytes) -> bytes:
    return b"%d %d %d\n" % (rc, len(out), len(err)) + out + err


def _write_fully(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- ssh: the one place that builds ssh command lines -------------------------

SSH_ALIVE_COUNT = 3
_SOCKET_PATH_MAX = 90   # sun_path is 108 bytes; ssh adds a temporary suffix


class Ssh:
    """ssh to one node.  A master connection (ControlMaster) is opened on
    first use and kept for ssh_control_persist seconds, so later commands
    reuse it: one round trip each, no handshake."""

    def __init__(self, cfg: Config, node: NodeConfig, control_dir: str,
                 ssh: str = "ssh") -> None:
        self.cfg = cfg
        self.node = node
        self.ssh = ssh
        self.control_dir = control_dir
        # set: the work this connection serves was ended (a master gives up
        # its role): every wait on the network ends at once with SshError
        self.stop = None   # type: Optional[threading.Event]
        # the name changes with anything that decides which connection it
        # is, so a changed configuration never reuses an old connection
        ident = "\x00".join([node.ssh, str(node.ssh_port), cfg.ssh_identity,
                              cfg.ssh_known_hosts])
        path = os.path.join(control_dir, "%s-%s" % (
            node.name, hashlib.sha256(ident.encode()).hexdigest()[:12]))
        self.control_path = path if len(path) <= _SOCKET_PATH_MAX else None
        if self.control_path is None:
            log.warning("the ssh control path %s is too long for a socket; every "
                        "ssh command will open its own connection (set state_db to "
                        "a shorter path)", path)

    @property
    def host(self) -> str:
        return self.node.ssh.split("@")[-1]

    @property
    def command_timeout(self) -> float:
        """Longest wait for a short remote command (a zfs get, a hold)."""
        return (self.cfg.ssh_connect_timeout + SSH_ALIVE_COUNT * self.cfg.ssh_alive_interval
                + ZFS_TIMEOUT)

    def options(self) -> List[str]:
        c = self.cfg
        opts = ["-p", str(self.node.ssh_port), "-i", c.ssh_identity,
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", "UserKnownHostsFile=" + c.ssh_known_hosts,
                "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
                "-o", "ConnectTimeout=%d" % max(1, int(c.ssh_connect_timeout + 0.999)),
                "-o", "ServerAliveInterval=%d" % max(1, int(c.ssh_alive_interval + 0.999)),
                "-o", "ServerAliveCountMax=%d" % SSH_ALIVE_COUNT]
        if self.control_path:
            opts += ["-o", "ControlPath=" + self.control_path]
        return opts

    def argv(self, remote) -> List[str]:
        """ssh command line running remote (a list of words, quoted here,
        or a fixed shell text) on the node through the master connection."""
        if not isinstance(remote, str):
            remote = " ".join(shlex.quote(w) for w in remote)
        return ([self.ssh] + self.options() + ["-o", "ControlMaster=no", "--",
                                                self.node.ssh, remote])

    def master_argv(self) -> List[str]:
        return ([self.ssh] + self.options() +
                ["-o", "ControlMaster=yes",
                 "-o", "ControlPersist=%d" % max(1, int(self.cfg.ssh_control_persist)),
                 "-N", "-f", "--", self.node.ssh])

    def ensure_master(self) -> None:
        """Open the master connection unless one is there.  It is started on
        its own, its output going to a file: a ControlPersist master inherits
        the first client's stderr and would keep a pipe open for minutes."""
        if not self.control_path or os.path.exists(self.control_path):
            return
        try:
            os.makedirs(self.control_dir, mode=0o700, exist_ok=True)
            os.chmod(self.control_dir, 0o700)
        except OSError as e:
            raise SshError("cannot make the ssh control directory %s: %s; make its "
                           "parent writable" % (self.control_dir, e.strerror)) from None
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(self.master_argv(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=err)
            except FileNotFoundError:
                raise SshError("the ssh command (%s) was not found; install the "
                               "OpenSSH client" % self.ssh) from None
            deadline = time.monotonic() + self.command_timeout
            while proc.poll() is None:
                if time.monotonic() >= deadline or self.stopped():
                    proc.kill()
                    proc.wait()
                    self.check_stop()
                    raise SshError(self.explain("Connection timed out"))
                time.sleep(0.02)
            err.seek(0)
            text = err.read().decode("utf-8", "replace")
        if proc.returncode != 0:
            raise SshError(self.explain(text))

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def check_stop(self) -> None:
        if self.stopped():
            raise SshError("the talk with %s was cut short: the replication cycle was "
                           "ended (this node gives up the master role, or the daemon "
                           "stops)" % self.where)

    def reset(self) -> None:
        """Close the gate session and the master connection (after a
        failure they may be dead)."""
        with _GATE_LOCK:
            session = _GATE_SESSIONS.pop(self.session_key, None)
            if session is not None:
                session.close()
        self.reset_master()

    def reset_master(self) -> None:
        """Close the master connection and clear its socket."""
        if not self.control_path:
            return
        if os.path.exists(self.control_path):
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                subprocess.run([self.ssh] + self.options() + ["-O", "exit", "--",
                                                              self.node.ssh],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=5)
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(self.control_path).st_mode):
                os.unlink(self.control_path)

    @property
    def session_key(self) -> str:
        return "\x00".join(self.argv(["session"]))

    def request(self, words: Sequence[str], timeout: Optional[float] = None
                ) -> subprocess.CompletedProcess:
        """Run one request of the ssh gate language (a list of words) on the
        node, over the gate session; SshError when ssh or the session
        failed, else the remote exit status and output."""
        timeout = self.command_timeout if timeout is None else timeout
        with _GATE_LOCK:
            for attempt in (1, 2):
                session, fresh = self._session()
                try:
                    return session.call(self, words, timeout)
                except _SessionLost as e:
                    if fresh or attempt == 2:
                        raise e.error from None
                    # a session kept from an earlier cycle had ended (its gate
                    # was stopped, the peer restarted): one more try, new one
        raise AssertionError("not reached")

    def gate_features(self, probe) -> "ZfsFeatures":
        """The peer's zfs features, probed once per gate session."""
        with _GATE_LOCK:
            session = _GATE_SESSIONS.get(self.session_key)
            if session is not None and session.alive() and session.features is not None:
                return session.features
            features = probe()
            session = _GATE_SESSIONS.get(self.session_key)
            if session is not None:
                session.features = features
            return features

    def _session(self) -> Tuple["GateSession", bool]:
        """The open gate session, or a new one (then True)."""
        key = self.session_key
        session = _GATE_SESSIONS.get(key)
        fresh_for = max(1.0, self.cfg.ssh_control_persist) / 2   # the gate waits the whole
        if session is not None and session.alive() and (
                time.monotonic() - session.last_used < fresh_for):
            return session, False
        if session is not None:
            session.close()
        session = _GATE_SESSIONS[key] = GateSession()
        session.start(self)
        return session, True

    @property
    def where(self) -> str:
        return "node %s (%s port %d)" % (self.node.name, self.node.ssh, self.node.ssh_port)

    def explain(self, stderr: str) -> str:
        """One actionable message for an ssh failure (exit status 255)."""
        text = _stderr_text(stderr)
        kh = self.cfg.ssh_known_hosts
        if ("Host key verification failed" in stderr or "HOST IDENTIFICATION" in stderr
                or "host key" in stderr.lower()):
            return ("the host key of %s is not the one in ssh_known_hosts %s (ssh: %s). "
                    "If the peer was reinstalled, check its key fingerprint on its "
                    "console and replace its line in %s (ssh-keyscan -p %d %s prints "
                    "it); otherwise someone may be impersonating it: do not proceed"
                    % (self.where, kh, text, kh, self.node.ssh_port, self.host))
        if "Permission denied" in stderr:
            return ("%s refused our key %s (ssh: %s); append %s.pub to the "
                    "authorized_keys of %s there"
                    % (self.where, self.cfg.ssh_identity, text, self.cfg.ssh_identity,
                       self.node.ssh.split("@")[0] if "@" in self.node.ssh else "the user"))
        unreachable = ("timed out", "No route to host", "Network is unreachable",
                       "Connection refused", "Connection reset", "Broken pipe",
                       "closed by remote host", "Could not resolve",
                       "read header failed", "Timeout, server")
        if any(u in stderr for u in unreachable):
            return ("cannot reach %s over ssh (ssh: %s); check the link between the "
                    "nodes and that sshd runs there; replication resumes by itself "
                    "once it answers" % (self.where, text))
        if text == "(no message)":
            return ("the ssh connection to %s ended without a word from ssh (the peer's "
                    "sshd, or the peer itself, may have stopped); it is tried again"
                    % self.where)
        return "ssh to %s failed (ssh: %s)" % (self.where, text)


class _SessionLost(Exception):
    """The gate session ended before it answered; error is what to raise."""

    def __init__(self, error: FlockerError) -> None:
        super().__init__(error.message)
        self.error = error


class GateSession:
    """One `session` request open on the peer's ssh gate: the short requests
    of replication travel over it, each one round trip (see the ssh gate
    below).  One session per peer connection and process, reused across
    replication cycles; a new one is started when it ended or sat idle."""

    def __init__(self) -> None:
        self.proc = None   # type: Optional[subprocess.Popen]
        self.err = None
        self.buf = b""
        self.last_used = 0.0
        self.features = None   # type: Optional[ZfsFeatures]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, ssh: "Ssh") -> None:
        for attempt in (1, 2):
            ssh.ensure_master()
            self.err = tempfile.TemporaryFile()
            self.buf = b""
            self.proc = subprocess.Popen(ssh.argv(["session"]), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self.err, bufsize=0)
            try:
                line = self._line(ssh, time.monotonic() + ssh.command_timeout)
            except _SessionLost as e:
                raise e.error from None
            words = line.decode("utf-8", "replace").split()
            if words[:2] != [GATE_BANNER, str(GATE_PROTOCOL)] or len(words) != 3:
                self.close()
                raise SshError(
                    "%s answered the gate session with %r instead of '%s %d NODE'; it "
                    "runs another version of flocker-failover's ssh gate: install the "
                    "same flocker_failover.py on both nodes"
                    % (ssh.where, line[:200].decode("utf-8", "replace"), GATE_BANNER,
                       GATE_PROTOCOL))
            if words[2] != ssh.node.name:
                self.close()
                raise SshError(
                    "ssh to %s reached the ssh gate of node %s: fix [node %s] ssh (or "
                    "address) in %s" % (ssh.where, words[2], ssh.node.name, ssh.cfg.path))
            self.last_used = time.monotonic()
            if "Control socket connect" not in _read_all(self.err) or attempt == 2:
                return
            # a master killed hard left its socket, so ssh connected on its
            # own: clear the socket and start again through a new master
            self.close()
            ssh.reset_master()

    def call(self, ssh: "Ssh", words: Sequence[str], timeout: float
             ) -> subprocess.CompletedProcess:
        """Send one request, read its answer; _SessionLost when the session
        ended without answering."""
        request = " ".join(shlex.quote(w) for w in words)
        deadline = time.monotonic() + timeout
        try:
            self.proc.stdin.write(request.encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError, ValueError):
            raise _SessionLost(self._ended(ssh)) from None
        head = self._line(ssh, deadline).decode("utf-8", "replace").split()
        if len(head) != 3 or not all(w.isdigit() for w in head):
            self.close()
            raise SshError("the ssh gate on %s sent %r instead of an answer; install "
                           "the same flocker_failover.py on both nodes" % (ssh.where, head))
        rc, nout, nerr = (int(w) for w in head)
        body = self._exactly(ssh, nout + nerr, deadline)
        self.last_used = time.monotonic()
        return subprocess.CompletedProcess(list(words), rc,
                                           body[:nout].decode("utf-8", "replace"),
                                           body[nout:].decode("utf-8", "replace"))

    def _more(self, ssh: "Ssh", deadline: float) -> None:
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:   # in short slices, so that ssh.stop ends the wait at once
                left = deadline - time.monotonic()
                if left > 0 and not ssh.stopped() and sel.select(timeout=min(left, 0.05)):
                    break
                if left <= 0 or ssh.stopped():
                    self.kill()
                    ssh.check_stop()
                    ssh.reset()
                    raise SshError("%s did not answer within %g s over ssh; the link or "
                                   "the host may be down; check both, then retry"
                                   % (ssh.where, ssh.command_timeout))
        chunk = os.read(fd, 65536)
        if not chunk:
            raise _SessionLost(self._ended(ssh))
        self.buf += chunk

    def _line(self, ssh: "Ssh", deadline: float) -> bytes:
        while b"\n" not in self.buf:
            if len(self.buf) > 65536:
                self.close()
                raise SshError("%s sent a line longer than 64 KiB instead of an ssh "
                               "gate answer" % ssh.where)
            self._more(ssh, deadline)
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def _exactly(self, ssh: "Ssh", n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            self._more(ssh, deadline)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _ended(self, ssh: "Ssh") -> FlockerError:
        """The error for a session that ended: ssh failed (status 255), or
        the peer has no gate for our key, or the gate stopped."""
        try:
            status = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            status = None
        text = _read_all(self.err) if self.err is not None else ""
        self.close()
        if status == 255:
            ssh.reset()
            return SshError(ssh.explain(text))
        if "ssh-gate" in text:
            return SshError("the ssh gate on %s: %s" % (ssh.where, _stderr_text(text)))
        return SshError(
            "%s runs no flocker-failover ssh gate for our key (ssh exited %s: %s); give "
            "%s.pub the forced command there, in root's authorized_keys: "
            "restrict,command=\"/usr/local/sbin/flocker_failover.py --config "
            "/etc/flocker/flocker.conf ssh-gate\" (README: \"The ssh gate\")"
            % (ssh.where, status, _stderr_text(text), ssh.cfg.ssh_identity))

    def kill(self) -> None:
        """End the session now, without waiting for the peer."""
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.kill()
        self.close()

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()       # the gate ends at end of input
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(OSError):
                proc.stdout.close()
        if self.err is not None:
            self.err.close()
            self.err = None
        self.features = None


# one session per peer connection (keyed by the ssh command line), shared by
# the RemoteZfs of every cycle in this process
_GATE_SESSIONS = {}   # type: Dict[str, GateSession]
_GATE_LOCK = threading.RLock()


@atexit.register
def _close_gate_sessions() -> None:
    # (a job thread still in a request at exit must not hold up the exit)
    locked = _GATE_LOCK.acquire(timeout=2)
    try:
        for s in list(_GATE_SESSIONS.values()):
            s.close()
        _GATE_SESSIONS.clear()
    finally:
        if locked:
            _GATE_LOCK.release()


class RemoteZfs(ZfsBase):
    """zfs on the peer, through its ssh gate (requests in the gate language,
    which for zfs is a zfs command line of the exact forms the gate takes)."""

    def __init__(self, ssh: Ssh) -> None:
        self.ssh = ssh
        self.where = "on " + ssh.where

    def run(self, args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
        proc = self.ssh.request(["zfs"] + list(args))
        if check and proc.returncode != 0:
            raise self._fail(args, proc.stderr)
        return proc

    def features(self) -> ZfsFeatures:
        if self._features is None:
            self._features = self.ssh.gate_features(
                lambda: parse_zfs_features(self._usage_text()))
        return self._features

    def _usage_text(self) -> str:
        proc = self.ssh.request(["features"])
        if proc.returncode != 0:
            raise ZfsError("cannot read the zfs features %s: %s"
                           % (self.where, _stderr_text(proc.stderr)))
        return proc.stdout

    def send_stream_is_empty(self, dataset: str, old: str, new: str) -> bool:
        return False   # only the master's own dataset is ever checked


# -- the transfer: zfs send | ssh peer zfs recv, both ends watched ------------

TRANSFER_CHUNK = 1 << 20
TRANSFER_TAIL = 64 << 10   # held back until zfs send exited 0 (see pipe_transfer)


@record(mutable=True)
class TransferOutcome:
    bytes: int
    seconds: float
    send_status: Optional[int]
    recv_status: Optional[int]
    send_stderr: str
    recv_stderr: str
    stalled: bool = False
    stopped: bool = False    # asked to stop (a role change, or the daemon is shutting down)

    @property
    def ok(self) -> bool:
        return (not self.stalled and not self.stopped and self.send_status == 0
                and self.recv_status == 0)


def _read_all(f) -> str:
    f.seek(0)
    return f.read().decode("utf-8", "replace")


class TransferProgress:
    """The transfer in flight, for status, the metrics and sync's progress
    line.  The transfer's thread writes it (plain attribute stores), anyone
    reads it; draw, when set, is called at most twice a second from the
    transfer's thread (sync on a terminal)."""

    def __init__(self, draw=None) -> None:
        self.draw = draw
        self.what = None           # type: Optional[str]
        self.total = None          # type: Optional[int]  # bytes expected (zfs send -nP)
        self.bytes = 0
        self.started = 0.0
        self._drawn = 0.0

    def begin(self, what: str, total: Optional[int], now: float) -> None:
        self.what, self.total, self.bytes, self.started = what, total, 0, now

    def moved(self, n: int, now: float) -> None:
        self.bytes = n
        if self.draw is not None and now - self._drawn >= 0.5:
            self._drawn = now
            self.draw(self.view(now))

    def end(self) -> None:
        self.what = None

    def view(self, now: float) -> Optional[dict]:
        """{what, bytes, total, seconds, rate, eta} (None: no transfer)."""
        what = self.what
        if what is None:
            return None
        seconds = max(0.0, now - self.started)
        rate = self.bytes / seconds if seconds >= 0.5 else None
        total = self.total
        eta = (max(0.0, (total - self.bytes) / rate)
               if total is not None and rate else None)
        return {"what": what, "bytes": self.bytes, "total": total,
                "seconds": round(seconds, 1),
                "rate_bytes_per_second": None if rate is None else int(rate),
                "eta_seconds": None if eta is None else round(eta, 1)}


def format_progress(v: dict) -> str:
    """One line: 'alpha -> beta: 12.0 of 50.0 MiB (24 %), 2.0 MiB/s, 19 s left'."""
    mib = 1024.0 * 1024.0
    done = "%.1f" % (v["bytes"] / mib)
    if v["total"]:
        done += " of %.1f MiB (%d %%)" % (v["total"] / mib,
                                         min(100, 100 * v["bytes"] // max(1, v["total"])))
    else:
        done += " MiB (total unknown)"
    rate = ("%.1f MiB/s" % (v["rate_bytes_per_second"] / mib)
            if v["rate_bytes_per_second"] is not None else "rate not known yet")
    eta = ", %d s left" % v["eta_seconds"] if v["eta_seconds"] is not None else ""
    return "%s: %s, %s%s" % (v["what"], done, rate, eta)


class TokenBucket:
    """replication_bandwidth: at most `rate` bytes a second on average, and
    never more than one second's worth at once (the bucket holds that
    much; it starts empty).  No clock of its own: callers pass monotonic
    `now`, so tests drive it with invented times."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = float(rate)
        self.tokens = 0.0
        self.at = now
        # the least worth a write: no trickle of tiny writes (a twentieth
        # of a second's worth, at least a page)
        self.quantum = max(4096.0, self.rate / 20)

    def _refill(self, now: float) -> None:
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def allowed(self, want: int, now: float) -> int:
        """How many of `want` bytes may go now (0: wait until ready_at)."""
        self._refill(now)
        if self.tokens + 1.0 < min(want, self.quantum):    # (a byte: float rounding)
            return 0
        return max(1, min(want, int(self.tokens + 1.0)))

    def spend(self, n: int) -> None:
        self.tokens -= n

    def ready_at(self, want: int, now: float) -> float:
        self._refill(now)
        return now + max(0.001, (min(want, self.quantum) - self.tokens) / self.rate)


def pipe_transfer(send_argv: Sequence[str], recv_argv: Sequence[str],
                  stall_timeout: float, finish_timeout: float = 120.0,
                  abort=None, stop: Optional[threading.Event] = None,
                  rate: int = 0, progress: Optional[TransferProgress] = None
                  ) -> TransferOutcome:
    """Run send_argv | recv_argv, relaying the stream through this process
    in chunks, so the bytes moved are counted and a stall is seen: when no
    byte moved for stall_timeout, both are killed.

    The last TRANSFER_TAIL bytes (they hold the stream's END record) are
    passed on only once zfs send has exited 0, so a receiver can never
    complete a stream whose sender failed, was killed or stalled (zfs-fuse
    even finishes writing the stream after its zfs client was killed).  On
    failure abort() is called (closing the ssh connection, so the peer ends
    its zfs recv at once) before the receiver is killed.  Setting stop
    aborts the transfer the same way (a role change, or the daemon is shutting
    down).  rate:
    at most that many bytes a second (TokenBucket; 0: no limit); a stream
    held back by it is not stalled."""
    started = time.monotonic()
    bucket = TokenBucket(rate, started) if rate else None
    send_err, recv_err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    send = recv = None
    try:
        send = subprocess.Popen(list(send_argv), executable=program_of(send_argv),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=send_err)
        recv = subprocess.Popen(list(recv_argv), stdin=subprocess.PIPE,
                                stdout=recv_err, stderr=recv_err)
        relay = _Relay(send, recv, stall_timeout, stop, bucket, progress)
        relay.run()
        log.debug("transfer: %d bytes relayed in %.2f s; eof=%s failed=%s stalled=%s",
                  relay.moved, time.monotonic() - started, relay.eof, relay.failed,
                  relay.stalled)
        send_status, recv_status = _end_transfer(send, recv, relay.failed, abort,
                                                 finish_timeout, recv_err)
        log.debug("transfer: zfs send exited %s, ssh/zfs recv %s, after %.2f s",
                  send_status, recv_status, time.monotonic() - started)
        return TransferOutcome(relay.moved, time.monotonic() - started, send_status,
                               recv_status, _read_all(send_err), _read_all(recv_err),
                               relay.stalled, relay.stopped)
    finally:
        for p in (send, recv):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
            if p is not None:
                for f in (p.stdin, p.stdout):
                    if f is not None:
                        with contextlib.suppress(OSError):
                            f.close()
        send_err.close()
        recv_err.close()


class _Relay:
    """The loop of pipe_transfer: moves the stream from zfs send's stdout
    to the receiver's stdin, TRANSFER_CHUNK at a time, through non-blocking
    pipes and one selector.  The newest TRANSFER_TAIL bytes read are held
    back (tail) until the sender has exited 0 (see pipe_transfer); what is
    ready to be written is `pending`, and the sender is not read while
    there is some.  Its fields are the transfer's state; run() returns
    when the whole stream is passed on or the transfer failed (failed,
    and why: stalled, stopped, or neither when a side failed)."""

    def __init__(self, send: subprocess.Popen, recv: subprocess.Popen,
                 stall_timeout: float, stop: Optional[threading.Event],
                 bucket: Optional[TokenBucket], progress: Optional[TransferProgress]) -> None:
        self.send, self.stall_timeout, self.stop = send, stall_timeout, stop
        self.bucket, self.progress = bucket, progress
        self.src, self.dst = send.stdout.fileno(), recv.stdin.fileno()
        for fd in (self.src, self.dst):
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, _F_SETPIPE_SZ, TRANSFER_CHUNK)
            os.set_blocking(fd, False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.src, selectors.EVENT_READ)
        self.pending = memoryview(b"")
        self.tail = b""              # held back until the sender succeeded; None: passed on
        self.eof = False
        self.held_until = 0.0        # the bucket is empty: writing resumes then
        self.last = time.monotonic()  # when data last moved
        self.moved = 0
        self.stalled = self.failed = self.stopped = False

    def run(self) -> None:
        try:
            while True:
                if self.eof and not self.pending and self._end_of_stream():
                    break
                for key, _ in self.sel.select(timeout=self._wait()):
                    if key.fd == self.src:
                        self._read()
                    else:
                        self._write()
                        if self.failed:
                            break
                if self._must_end():
                    break
        finally:
            self.sel.close()

    def _end_of_stream(self) -> bool:
        """The sender's stream has ended and all of it but the tail is
        passed on: wait for zfs send's exit status, then pass the tail on.
        True when the loop is done (all passed on, or failed)."""
        if self.tail is None:
            return True                       # everything passed on
        try:
            status = self.send.wait(timeout=self.stall_timeout)
        except subprocess.TimeoutExpired:
            self.stalled = self.failed = True     # stream ended, sender hangs
            return True
        if status != 0:
            self.failed = True
            return True
        self.pending, self.tail = memoryview(self.tail), None
        if not self.pending:
            return True
        self.sel.register(self.dst, selectors.EVENT_WRITE)
        return False

    def _wait(self) -> float:
        """How long select may wait; writing resumes once the bandwidth
        limit allows it again (time held back counts as no stall)."""
        wait = min(1.0, self.stall_timeout)
        if self.held_until:
            now = time.monotonic()
            if now >= self.held_until:
                self.held_until = 0.0
                self.sel.register(self.dst, selectors.EVENT_WRITE)
            else:
                wait = min(wait, self.held_until - now)
                self.last = now          # held back by the limit, not stalled
        return wait

    def _read(self) -> None:
        """One chunk from the sender: all but the newest TRANSFER_TAIL
        bytes become pending (and reading pauses until they are written)."""
        try:
            chunk = os.read(self.src, TRANSFER_CHUNK)
        except BlockingIOError:
            return
        self.last = time.monotonic()
        if not chunk:
            self.eof = True
            self.sel.unregister(self.src)
            return
        data = self.tail + chunk if self.tail else chunk
        if len(data) <= TRANSFER_TAIL:
            self.tail = data
            return
        self.tail = data[-TRANSFER_TAIL:]
        self.pending = memoryview(data)[:-TRANSFER_TAIL]
        self.sel.unregister(self.src)
        self.sel.register(self.dst, selectors.EVENT_WRITE)

    def _write(self) -> None:
        """As much of pending as the receiver takes and the bandwidth limit
        allows; reading resumes once all of it is written."""
        size = len(self.pending)
        if self.bucket is not None:
            size = self.bucket.allowed(size, time.monotonic())
            if not size:
                self.sel.unregister(self.dst)
                self.held_until = self.bucket.ready_at(len(self.pending), time.monotonic())
                return
        try:
            n = os.write(self.dst, self.pending[:size])
        except BlockingIOError:
            return
        except (BrokenPipeError, ConnectionResetError):
            self.failed = True    # the receiving side ended early
            return
        if self.bucket is not None:
            self.bucket.spend(n)
        self.moved += n
        if self.progress is not None:
            self.progress.moved(self.moved, time.monotonic())
        self.last = time.monotonic()
        self.pending = self.pending[n:]
        if not self.pending:
            self.sel.unregister(self.dst)
            if not self.eof:
                self.sel.register(self.src, selectors.EVENT_READ)

    def _must_end(self) -> bool:
        """True when the transfer has failed: a side failed, the sender
        exited non-zero, nothing moved for stall_timeout, or stop is set."""
        if self.failed:
            return True
        if self.send.poll() is not None and self.send.returncode != 0:
            self.failed = True   # zfs-fuse's daemon may still be writing its stream
            return True
        if time.monotonic() - self.last > self.stall_timeout:
            self.stalled = self.failed = True
            return True
        if self.stop is not None and self.stop.is_set():
            self.stopped = self.failed = True
            return True
        return False


def _end_transfer(send: subprocess.Popen, recv: subprocess.Popen, failed: bool, abort,
                  finish_timeout: float, recv_err) -> Tuple[int, int]:
    """After the relay: on failure kill the sender, abort() (the peer ends
    its receive), kill the receiver; then close the receiver's input and
    give it finish_timeout to finish (killed after that, and said so in
    its stderr).  Returns both exit statuses."""
    if failed:
        send.kill()
        if abort is not None:
            abort()
        recv.kill()
    send_status = send.wait()
    with contextlib.suppress(OSError):
        recv.stdin.close()
    try:
        recv_status = recv.wait(timeout=finish_timeout)
    except subprocess.TimeoutExpired:
        recv.kill()
        recv_status = recv.wait()
        recv_err.write(("\nthe remote zfs recv did not finish within %g s after "
                        "the end of the stream" % finish_timeout).encode())
    return send_status, recv_status


# -- commands of the operator (start, stop, check, notify) --------------------

@record
class CommandResult:
    argv: Tuple[str, ...]
    returncode: Optional[int]    # None: killed (timeout, or asked to stop)
    output: str                  # the last 2000 bytes of stdout and stderr
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def tail(self) -> str:
        return _stderr_text(self.output)

    def describe(self) -> str:
        what = ("was killed after %.1f s" % self.seconds
                if self.returncode is None else "exited %d" % self.returncode)
        return "'%s' %s: %s" % (" ".join(self.argv), what, self.tail)


def run_command(argv: Sequence[str], timeout: float, env: Optional[Dict[str, str]] = None,
                stop: Optional[threading.Event] = None, forked=None) -> CommandResult:
    """Run an operator's command (start, stop, check, notify, fence), no
    shell, in its own process group.  When it runs longer than timeout, or
    stop is set, the whole group is killed (TERM, then KILL 2 s later), so a
    hung hook cannot linger.  Output goes to a file, not a pipe: a service
    that leaves a child holding stdout cannot make this wait.  Never raises
    for the command's own failures; a missing program is status 127.
    forked(): called once the command runs (or could not be started), while
    it runs: what is to happen meanwhile."""
    started = time.monotonic()
    full_env = dict(os.environ)
    full_env.update(env or {})
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=full_env,
                                    start_new_session=True)
        except OSError as e:
            if forked is not None:
                forked()
            return CommandResult(tuple(argv), 127, "cannot run %s: %s" % (argv[0], e.strerror),
                                 time.monotonic() - started)
        if forked is not None:
            forked()
        deadline = started + timeout
        status = None  # type: Optional[int]
        while True:
            try:
                status = proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                    _kill_group(proc)
                    break
        out.seek(max(0, out.seek(0, os.SEEK_END) - 2000))
        tail = out.read().decode("utf-8", "replace")
    return CommandResult(tuple(argv), status, tail, time.monotonic() - started)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


# -- systemd (Type=notify) ----------------------------------------------------

class SystemdNotifier:
    """sd_notify(3) with the standard library: datagrams to $NOTIFY_SOCKET
    (a path, or '@name' for the abstract namespace).  The variables are
    taken out of the environment, so commands we start cannot send systemd
    messages in our name.  Without NOTIFY_SOCKET every call does nothing."""

    def __init__(self, environ=None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.pop("NOTIFY_SOCKET", "")
        usec = environ.pop("WATCHDOG_USEC", "")
        pid = environ.pop("WATCHDOG_PID", "")
        self.address = ("\0" + address[1:]) if address.startswith("@") else address
        # ping twice per watchdog period, as sd_watchdog_enabled(3) advises
        self.watchdog = None  # type: Optional[float]
        if usec.isdigit() and int(usec) > 0 and pid in ("", str(os.getpid())):
            self.watchdog = int(usec) / 2e6
        self._sock = None  # type: Optional[socket.socket]
        self._warned = False
        self._told_ready = False

    def beat(self, status: str) -> None:
        """READY=1 the first time, then STATUS, and WATCHDOG=1 when
        WatchdogSec is set (the daemon calls it from its loop, so a stuck
        loop stops it)."""
        fields = ["STATUS=" + status]
        if not self._told_ready:
            fields.insert(0, "READY=1")
            self._told_ready = True
        if self.watchdog:
            fields.append("WATCHDOG=1")
        self.notify(*fields)

    def notify(self, *fields: str) -> bool:
        if not self.address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.sendto("\n".join(fields).encode("utf-8"), self.address)
            return True
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot send to systemd's notify socket %s: %s",
                            self.address.replace("\0", "@"), e.strerror)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- receives in flight, the arbitrator ---------------------------------------

def mount_is_read_only(dataset: str) -> bool:
    """True when the kernel holds dataset's own ZFS mount read-only (its
    per-mount options in /proc/self/mountinfo; OpenZFS).  zfs-fuse's mounts
    are FUSE mounts whose read-only state zfs-fuse keeps itself, following
    the readonly property at once: never True for them."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return False
    return read_only_in_mountinfo(text, dataset)


def read_only_in_mountinfo(text: str, dataset: str) -> bool:
    """mount_is_read_only() of a mountinfo text (pure)."""
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if sep and len(fields) >= 6 and len(rest) >= 2 and rest[0] == "zfs" and \
                rest[1].replace("\\040", " ") == dataset:
            return "ro" in fields[5].split(",")
    return False


def _proc_read(path: str, size: int) -> Optional[bytes]:
    """At most size bytes of a /proc file; None when it cannot be read (the
    process has gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)


def kill_receives(dataset: str, grace: float = 3.0) -> List[int]:
    """Stop every 'zfs recv'/'zfs receive' into dataset (or a child) on this
    host, e.g. one the old master's ssh session still feeds: a promoted
    dataset must not change under the user system.  Returns their pids."""
    pids = []
    for entry in os.listdir("/proc"):
        # the name of its program first (task_struct's comm, cheap); the
        # command line only of a zfs: reading one waits while that process
        # forks or execs, and a promotion reads all of them (1.3 against
        # 6 ms, 150 processes, a busy host)
        if not entry.isdigit() or _proc_read("/proc/%s/comm" % entry, 32) != b"zfs\n":
            continue
        raw = _proc_read("/proc/%s/cmdline" % entry, 1 << 16)
        argv = [a.decode("utf-8", "replace") for a in (raw or b"").split(b"\0") if a]
        if (len(argv) >= 3 and os.path.basename(argv[0]) == "zfs"
                and argv[1] in ("recv", "receive") and "-A" not in argv
                and (argv[-1] == dataset or argv[-1].startswith(dataset + "/"))):
            pids.append(int(entry))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                alive.append(pid)
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if os.path.exists("/proc/%d" % p)]
            time.sleep(0.05)
        if not alive:
            break
    if pids:
        log.warning("stopped %d unfinished receive(s) into %s: pids %s", len(pids), dataset,
                    ", ".join(map(str, pids)))
    return pids


def probe_arbitrator(cfg: Config, stop: Optional[threading.Event] = None) -> Tuple[bool, str]:
    """Can this node reach the arbitrator now?  (reachable, how it answered).
    A TCP connection that is accepted or refused proves the path: an answer
    came back from that address."""
    if cfg.arbitrator_command is not None:
        r = run_command(cfg.arbitrator_command, cfg.arbitrator_timeout, stop=stop)
        return r.ok, r.describe()
    host, port = cfg.arbitrator
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(cfg.arbitrator_timeout)
        try:
            s.connect((host, port))
            return True, "connection accepted"
        except ConnectionRefusedError:
            return True, "connection refused (it answered)"
        except socket.timeout:
            return False, "no answer within %g s" % cfg.arbitrator_timeout
        except OSError as e:
            return False, e.strerror or str(e)


def ask_witness(cfg: Config, request: WitnessMessage,
                stop: Optional[threading.Event] = None
                ) -> Tuple[float, Optional[WitnessMessage], str, int]:
    """Send one request to the witness and wait up to witness_timeout for
    its answer: (monotonic time the request left, the answer or None, why
    there is none, how many other datagrams came and were refused).  Only
    the answer that echoes this request's nonce, generation and sequence
    counts; from whichever address it comes (the socket is not connected:
    a witness listening on 0.0.0.0 of a host with several addresses may
    answer from another one than it was asked at; the answer is signed)."""
    host, port = cfg.witness
    keys = wire_keys(cfg.secret, cfg.secret_previous)
    refused = 0
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                       socket.SOCK_DGRAM) as s:
        try:
            sent_at = time.monotonic()
            s.sendto(encode_witness(request, cfg.secret), (host, port))
        except OSError as e:
            return time.monotonic(), None, e.strerror or str(e), refused
        deadline = sent_at + cfg.witness_timeout
        while not (stop is not None and stop.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                data = s.recv(2048)
            except socket.timeout:
                break
            except OSError as e:
                return sent_at, None, e.strerror or str(e), refused
            try:
                m = decode_witness(data, keys)
            except WireReject:
                refused += 1
                continue
            if (m.kind != WITNESS_ANSWER or m.nonce != request.nonce
                    or (m.generation, m.sequence) != (request.generation, request.sequence)
                    or m.cluster != request.cluster or m.node != request.node):
                refused += 1
                continue
            return sent_at, m, "", refused
        return sent_at, None, "no answer within %g s" % cfg.witness_timeout, refused


# -- the service address ------------------------------------------------------

def _ip(args: Sequence[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["ip"] + list(args), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=30)
    except FileNotFoundError:
        raise FlockerError("the ip command (iproute2) was not found; it is needed to move "
                           "service_address") from None


def address_present(sa: ServiceAddress) -> bool:
    proc = _ip(["-o", "addr", "show", "dev", sa.device])
    if proc.returncode != 0:
        raise FlockerError("cannot list the addresses of %s: %s; check service_address"
                           % (sa.device, _stderr_text(proc.stderr)))
    return any(line.split()[3] == "%s/%d" % (sa.address, sa.prefix)
               for line in proc.stdout.splitlines() if len(line.split()) > 3)


def add_service_address(sa: ServiceAddress) -> bool:
    """Add the address (idempotent).  Returns True when it was added."""
    if address_present(sa):
        return False
    # IPv6: no duplicate address detection, which would keep the address
    # unusable (tentative) for a second; the old master has given it up
    proc = _ip(["addr", "add", "%s/%d" % (sa.address, sa.prefix), "dev", sa.device]
               + (["nodad"] if ":" in sa.address else []))
    if proc.returncode != 0:
        raise FlockerError("cannot add %s: %s" % (sa, _stderr_text(proc.stderr)))
    return True


def remove_service_address(sa: ServiceAddress) -> bool:
    if not address_present(sa):
        return False
    proc = _ip(["addr", "del", "%s/%d" % (sa.address, sa.prefix), "dev", sa.device])
    if proc.returncode != 0:
        raise FlockerError("cannot remove %s: %s" % (sa, _stderr_text(proc.stderr)))
    return True


def announce_address(sa: ServiceAddress, count: int = 5, interval: float = 0.05) -> int:
    """Announce that this host now owns the service address, so neighbours
    update their caches at once: for IPv4, gratuitous ARP (broadcast ARP
    requests whose sender and target are the address itself, what arping
    -U does); for IPv6, unsolicited neighbour advertisements with the
    override flag to all nodes (ff02::1), as keepalived sends them.
    Returns the number of packets sent."""
    if ":" in sa.address:
        return _unsolicited_na(sa, count, interval)
    ip4 = socket.inet_aton(sa.address)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((sa.device, 0x0806))
        mac = s.getsockname()[4]       # this interface's hardware address
        frame = (b"\xff" * 6 + mac + b"\x08\x06"               # Ethernet: to all, ARP
                 + b"\x00\x01\x08\x00\x06\x04\x00\x01"    # Ethernet/IPv4, request
                 + mac + ip4 + b"\x00" * 6 + ip4)
        for i in range(count):
            s.send(frame)
            if i + 1 < count:
                time.sleep(interval)
    return count


def _unsolicited_na(sa: ServiceAddress, count: int, interval: float) -> int:
    """ICMPv6 neighbour advertisements for sa (RFC 4861 7.2.6): from the
    address itself, hop limit 255, flags override, with the target's
    link-layer address; the kernel fills in the checksum."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as p:
        p.bind((sa.device, 0x86DD))
        mac = p.getsockname()[4]       # this interface's hardware address
    target = socket.inet_pton(socket.AF_INET6, sa.address)
    message = (struct.pack("!BBHI", 136, 0, 0, 0x20000000) + target
               + struct.pack("!BB", 2, 1) + mac)
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF,
                     socket.if_nametoindex(sa.device))
        s.bind((sa.address, 0))
        for i in range(count):
            s.sendto(message, ("ff02::1", 0, 0, socket.if_nametoindex(sa.device)))
            if i + 1 < count:
                time.sleep(interval)
    return count


# ===========================================================================
# 6. The decision core (pure functions)
# ===========================================================================
#
# Pure functions: the facts a node has at one instant go in, one decision
# comes out (which snapshots to send and prune, which role to take, which
# side of a divergence continues).  No I/O, no clock reads: every rule is
# unit-tested directly.  (tests/test_layers.py holds this section to it.)

# -- replication planning: snapshot names, the common snapshot, retention -----


def snapshot_name(epoch: int, now: float) -> str:
    """flocker-<epoch>-<UTC time to the millisecond>Z, e.g.
    flocker-3-20260101T120000.250Z: any host can tell the reign from it."""
    ms = int(round(now * 1000))
    return "%s%d-%s.%03dZ" % (SNAPSHOT_PREFIX, epoch,
                              time.strftime("%Y%m%dT%H%M%S", time.gmtime(ms // 1000)),
                              ms % 1000)


def is_flocker_snapshot(name: str) -> bool:
    return bool(_SNAPSHOT_RE.match(name))


def snapshot_time(name: str) -> Optional[float]:
    """The UTC time written in a flocker snapshot name, else None."""
    m = _SNAPSHOT_RE.match(name)
    if not m:
        return None
    import calendar     # (here, not for every process: 2 ms of each start)
    t = calendar.timegm(time.strptime(m.group(2), "%Y%m%dT%H%M%S"))
    return t + (int(m.group(3)) / 1000.0 if m.group(3) else 0.0)


def snapshot_epoch(name: str) -> Optional[int]:
    """The epoch written in a flocker snapshot name, else None."""
    m = _SNAPSHOT_RE.match(name)
    return int(m.group(1)) if m else None


def role_marker(node: str, role: str, epoch: int) -> str:
    """The value of the flocker:role property a node keeps on its dataset."""
    return "%s %s %d" % (node, role, epoch)


def parse_role_marker(value: Optional[str]) -> Optional[Tuple[str, str, int]]:
    """(node, role, epoch) from a flocker:role value; None when unset ('-')
    or not ours.  The node name is part of the value because zfs send -R
    copies user properties: a replica carrying its master's marker names
    that master, not itself."""
    words = (value or "").split()
    if len(words) != 3 or words[1] not in ROLES or not words[2].isdigit():
        return None
    return words[0], words[1], int(words[2])


def epoch_in_listing(listing: Optional[Listing]) -> int:
    """The highest epoch a dataset's snapshot names and role marker carry
    (0 for none): epochs a node has seen, whether or not it heard them."""
    if listing is None:
        return 0
    marker = parse_role_marker(listing.props.get(ROLE_PROPERTY))
    return max([marker[2] if marker else 0] +
               [e for e in (snapshot_epoch(x.name) for x in listing.snaps) if e is not None])


def find_common(local: Listing, remote: Listing) -> Optional[Snap]:
    """The newest snapshot of local whose GUID the remote also has (the
    names may differ; the GUID is what proves it is the same data)."""
    theirs = remote.guids
    for snap in reversed(local.snaps):
        if snap.guid and snap.guid in theirs:
            return snap
    return None


def snaps_after(listing: Listing, guid: str) -> List[Snap]:
    """The snapshots of listing newer than the one with this GUID."""
    for i, s in enumerate(listing.snaps):
        if s.guid == guid:
            return list(listing.snaps[i + 1:])
    return list(listing.snaps)


def plan_prune(snaps: Sequence[Snap], keep: int, protect: Sequence[str]) -> List[str]:
    """Retention: names to destroy so that at most `keep` flocker snapshots
    remain besides the protected ones.  Never a protected, a held, a pinned
    (a clone depends on it) or a foreign (not flocker-named) snapshot."""
    ours = [s for s in snaps if is_flocker_snapshot(s.name)]
    keep_names = set(s.name for s in ours[-keep:]) if keep > 0 else set()
    return [s.name for s in ours
            if s.name not in keep_names and s.name not in protect and s.userrefs == 0
            and not s.pinned]


def build_send_argv(dataset: str, target: str, base: Optional[str], recursive: bool,
                    flags: Sequence[str] = ()) -> List[str]:
    """zfs send of target: full when base is None, else one -I stream that
    carries every snapshot between base and target."""
    argv = ["zfs", "send"] + list(flags) + (["-R"] if recursive else [])
    if base is not None:
        argv += ["-I", "%s@%s" % (dataset, base)]
    return argv + ["%s@%s" % (dataset, target)]


def build_resume_send_argv(token: str) -> List[str]:
    """zfs send of the rest of an interrupted resumable receive."""
    return ["zfs", "send", "-t", token]


def build_recv_argv(dataset: str, resumable: bool) -> List[str]:
    """zfs recv on the slave: -u (never mounted by the receive), never -F
    (it would roll back or destroy what the slave has), -s where the slave
    can keep a partial stream for resuming."""
    return ["zfs", "recv", "-u"] + (["-s"] if resumable else []) + [dataset]


def explain_transfer(outcome: TransferOutcome, what: str, peer: str,
                     peer_dataset: str, stall_timeout: float,
                     ssh_explain=None, note: str = "") -> str:
    """One message from the exit statuses and stderr of zfs send, ssh and
    the remote zfs recv, and a note on what became of the partial receive
    (pure)."""
    parts = []
    if outcome.stopped:
        parts.append("the transfer was stopped: this node gives up the master role, or "
                     "flocker-failover is shutting down")
    send_text = _stderr_text(outcome.send_stderr)
    recv_text = _stderr_text(outcome.recv_stderr)
    both = outcome.send_stderr + "\n" + outcome.recv_stderr
    if outcome.stalled:
        parts.append("no data moved for %g s (transfer_stall_timeout), so the "
                     "transfer was stopped; the link or the peer's pool may be hung"
                     % stall_timeout)
    if zfs_says("no_space", both):
        parts.append("the pool of %s on %s is full: free space there (or lower "
                     "snapshot_keep), then sync again" % (peer_dataset, peer))
    if zfs_says("modified", both):
        parts.append("the replica %s on %s was changed there since its newest "
                     "snapshot (someone wrote to it while it was slave); it was "
                     "not rolled back. Copy out what you need from it on %s, then "
                     "roll it back there with 'zfs rollback %s@<its newest "
                     "snapshot>' and sync again" % (peer_dataset, peer, peer,
                                                    peer_dataset))
    if outcome.send_status not in (0, None) and not (outcome.stalled or outcome.stopped):
        if outcome.send_status < 0:
            parts.append("zfs send was killed by signal %d" % -outcome.send_status)
        else:
            parts.append("zfs send exited %d: %s" % (outcome.send_status, send_text))
    aborted = outcome.stalled or outcome.stopped or outcome.send_status not in (0, None)
    if aborted and outcome.recv_status in (255, None) or (
            outcome.recv_status is not None and outcome.recv_status < 0):
        parts.append("the transfer to %s was aborted before its end" % peer)
    elif outcome.recv_status == 255 and ssh_explain is not None:
        parts.append(ssh_explain(outcome.recv_stderr))
    elif outcome.recv_status not in (0, None):
        if outcome.recv_status < 0:
            parts.append("ssh was stopped (signal %d)" % -outcome.recv_status)
        elif outcome.recv_stderr.strip():
            parts.append("zfs recv on %s exited %d: %s" % (peer, outcome.recv_status,
                                                           recv_text))
    if not parts:
        parts.append("zfs send exited %s, ssh/zfs recv exited %s"
                     % (outcome.send_status, outcome.recv_status))
    if note:
        parts.append(note)
    return ("sending %s to %s failed after %d bytes: %s. Nothing was changed on "
            "either node; the next cycle tries again"
            % (what, peer, outcome.bytes, "; ".join(parts)))


# -- roles --------------------------------------------------------------------
#
# Epochs: each node owns one parity of epochs (the first node by name the
# even ones, the second the odd ones), and a promotion takes the smallest
# epoch of its own parity above every epoch it has seen.  So two nodes can
# never hold the same epoch, and any two reigns are strictly ordered.

DECIDE_WAIT = "wait"              # nothing to do now; the reason says why
DECIDE_RESUME = "resume"          # a starting master starts serving again
DECIDE_FENCE = "fence"            # run the fence command, then decide again
DECIDE_PROMOTE = "promote"        # this slave becomes master (new epoch)
DECIDE_DEMOTE = "demote"          # a starting master yields to a newer master
DECIDE_STEP_DOWN = "step-down"    # an isolated master stops serving
DECIDE_HANDOVER = "handover"      # planned switchover to the healthy slave
DECIDE_SPLIT_BRAIN = "split-brain"  # two serving masters: the divergence verdict decides
DECIDE_RESOLVE = "resolve"        # (the daemon's job that carries the verdict out)
ROLE_RECOVER = "recover"          # (the daemon's job that finishes an interrupted action)
# the role jobs whose success leaves a master running the user system
SERVING_KINDS = (DECIDE_PROMOTE, DECIDE_RESUME, DECIDE_RESOLVE)


def next_epoch(highest_seen: int, index: int) -> int:
    """The smallest epoch above highest_seen that belongs to node index."""
    epoch = highest_seen + 1
    if epoch % 2 != index % 2:
        epoch += 1
    return epoch


def promotion_epoch(index: int, *seen: int) -> int:
    """The epoch a promotion of node index takes: the smallest of its own
    parity above every epoch it has seen (its own, the peer's, those its
    replica carries), so that the new reign is newer than any before it."""
    return next_epoch(max(seen), index)


def state_behind_dataset(node: str, role: str, epoch: int,
                         marker: Optional[Tuple[str, str, int]]) -> Optional[Tuple[str, int]]:
    """The (role, epoch) this node must take when its state file is older
    than its own dataset's flocker:role marker (the file was restored from
    a backup, a VM snapshot reverted): the marker is written after the
    state at every role change, so a newer epoch there, or the same epoch
    as slave where the file says master, is what the node did since.
    None when the state file is current."""
    if marker is None or marker[0] != node:
        return None
    m_role, m_epoch = marker[1], marker[2]
    if m_epoch > epoch or (m_epoch == epoch and role == ROLE_MASTER and m_role == ROLE_SLAVE):
        return m_role, m_epoch
    return None


def isolation_time(dead_time: float, heartbeat_interval: float) -> float:
    """How long an isolated master waits before it steps down.  The slave
    promotes after dead_time of silence as it measures it; the master's
    measure of the same silence can lag by one interval (the last packet
    each side got), so the master acts two intervals earlier."""
    return max(heartbeat_interval, dead_time - 2 * heartbeat_interval)


@record
class Timing:
    dead_time: float
    startup_wait: float
    wait_for_peer: bool
    isolation_time: float
    # consecutive failed checks before a handover
    check_failures: int = SERVICE_DEFAULTS["check_failures"]
    hold_down: float = SERVICE_DEFAULTS["hold_down"]   # seconds before the role may move again
    witness_lead: float = 0.0     # a master whose peer is silent steps down with this
    #                               much of the witness's lease left (witness_lead())


@record
class Facts:
    """What one node knows at one instant.  Times are seconds measured
    on the monotonic clock by the caller."""
    role: str                      # own persisted role
    epoch: int                     # own epoch
    index: int                     # node_index() of this node
    serving: bool                  # this daemon runs the user system now
    outdated: bool                 # own replica known to be behind the master
    uptime: float                  # since this daemon started
    peer_heard: bool               # a valid heartbeat arrived since start
    peer_silence: float            # since the last valid heartbeat (or since start)
    peer_role: Optional[str] = None
    peer_epoch: Optional[int] = None
    highest_epoch_seen: int = 0    # persisted: the highest epoch ever seen
    arbitrator: Optional[bool] = None   # None: none configured; else reachable?
    fence: Optional[bool] = None        # None: none configured; else has it succeeded?
    force: bool = False            # the operator forces a takeover
    service_failures: int = 0      # consecutive failed checks (master)
    peer_up_to_date: bool = False  # the slave holds our newest snapshot
    since_role_change: float = float("inf")
    peer_serving: bool = False     # the peer says it runs the user system
    peer_released: bool = False    # the peer handed the master role over
    holds_peer_newest: bool = False  # our newest snapshot is the peer's newest
    released: bool = False         # this node handed the master role over
    peer_requests_handover: bool = False  # the slave's operator ran 'promote'
    operator_handover: bool = False  # this master's operator ran 'demote'
    force_peer_alive: bool = False   # 'promote --force' although the peer is heard
    # the epoch of the peer's newest authentic packet within dead_time when
    # it says "master, serving", also when it does not echo ours (it does
    # not hear us: one direction of the link is lost); None otherwise.
    # Acted on only in the safe direction: never promote, step down.
    peer_claim_epoch: Optional[int] = None
    has_peer_newest: bool = False    # the peer's newest snapshot is among ours
    witness: Optional[float] = None  # None: no witness configured; else seconds
    #                                  left of this node's lease (0: holds none)
    witness_other: bool = False      # the witness said the peer holds its lease

    @property
    def new_epoch(self) -> int:
        """The epoch this node takes if it promotes now."""
        return promotion_epoch(self.index, self.epoch, self.highest_epoch_seen,
                               self.peer_epoch or 0)


@record
class Decision:
    kind: str
    reason: str
    epoch: Optional[int] = None    # the new epoch of a promotion


def peer_alive(f: Facts, t: Timing) -> bool:
    return f.peer_heard and f.peer_silence < t.dead_time


def decide(f: Facts, t: Timing) -> Decision:
    """The one place the role rules live."""
    if f.role == ROLE_SLAVE:
        return _decide_slave(f, t)
    if not f.serving:
        return _decide_starting_master(f, t)
    return _decide_serving_master(f, t)


def _decide_slave(f: Facts, t: Timing) -> Decision:
    if peer_alive(f, t):
        if f.force and f.force_peer_alive:
            if f.fence is False:
                return Decision(DECIDE_FENCE, "the operator forces a takeover: fence the peer "
                                              "first")
            return Decision(DECIDE_PROMOTE, "the operator forced a takeover although the "
                                            "peer is alive", f.new_epoch)
        if f.peer_role == ROLE_MASTER:
            return Decision(DECIDE_WAIT, "the peer is master (epoch %s)" % f.peer_epoch)
        if f.peer_released and (f.peer_epoch or 0) < f.epoch:
            return Decision(DECIDE_WAIT, "the peer handed over the master role of epoch %s, "
                                         "which this node took already (epoch %d)"
                            % (f.peer_epoch, f.epoch))
        if f.peer_released:
            if not f.holds_peer_newest:
                return Decision(DECIDE_WAIT, "the peer handed the master role over, but "
                                             "this replica lacks its newest snapshot")
            return Decision(DECIDE_PROMOTE, "the peer handed the master role over",
                            f.new_epoch)
        if f.released:
            return Decision(DECIDE_WAIT, "this node handed the master role over; waiting "
                                         "for the peer to take it")
        return _decide_between_slaves(f, t)
    if not f.force:
        if f.peer_claim_epoch is not None:
            return Decision(DECIDE_WAIT, "the peer's heartbeats arrive (master, epoch %d, "
                                         "serving) but it does not hear this node: one "
                                         "direction of the link is lost; not taking over"
                            % f.peer_claim_epoch)
        if not f.peer_heard:
            if t.wait_for_peer:
                return Decision(DECIDE_WAIT, "the peer was never heard since start and "
                                             "wait_for_peer = yes")
            if f.uptime < t.startup_wait + t.dead_time:
                return Decision(DECIDE_WAIT, "starting: listening for the peer")
        if f.outdated:
            return Decision(DECIDE_WAIT, "the peer is silent, but this replica is known to "
                                         "be outdated; 'promote --force' takes over anyway")
        if f.arbitrator is False:
            return Decision(DECIDE_WAIT, "the peer is silent, but the arbitrator is not "
                                         "reachable either: this node may be the isolated one")
        if f.witness is not None and f.witness <= 0:
            return Decision(DECIDE_WAIT, "the peer is silent, but this node does not hold "
                                         "the witness's lease: %s" % (
                                             "the peer holds it" if f.witness_other else
                                             "the peer may still serve, or the witness "
                                             "does not answer"))
    if f.fence is False:
        return Decision(DECIDE_FENCE, "the peer is silent: fence it before taking over")
    epoch = f.new_epoch
    why = ("the operator forced a takeover" if f.force else
           "no valid heartbeat for %.1f s" % f.peer_silence)
    return Decision(DECIDE_PROMOTE, why, epoch)


def _decide_between_slaves(f: Facts, t: Timing) -> Decision:
    """Both nodes are slaves and hear each other, neither handed over (a
    master stepped down while its slave could not take over: outdated, or
    the fault healed before dead_time).  The node whose replica holds the
    other's newest snapshot and more promotes; with the same newest
    snapshot, the newer epoch (then the first node by name).  Both decide
    from the same facts, so exactly one promotes; when neither holds the
    other's newest (they diverged) an operator decides.  Only while the
    peer is heard right now: a node that stepped down as isolated still
    counts its peer alive for a moment, on its last packets.  (Not the
    arbitrator: a peer that is heard proves the path, and the arbitrator
    fact only counts answers that came after the peer's last packet.)"""
    epoch = f.new_epoch
    if f.peer_silence >= t.isolation_time:
        return Decision(DECIDE_WAIT, "no master: both nodes are slaves, but the peer was "
                                     "last heard %.1f s ago" % f.peer_silence)
    if f.has_peer_newest and not f.holds_peer_newest:
        return Decision(DECIDE_PROMOTE, "both nodes are slaves, and this one holds the newer "
                                        "data (the peer's newest snapshot and more)", epoch)
    if f.holds_peer_newest:
        if (f.epoch, -f.index) > (f.peer_epoch or 0, f.index - 1):
            return Decision(DECIDE_PROMOTE, "both nodes are slaves with the same newest "
                                            "snapshot; this one has the newer epoch (or "
                                            "comes first by name)", epoch)
        return Decision(DECIDE_WAIT, "both nodes are slaves with the same newest snapshot: "
                                     "the peer takes over")
    return Decision(DECIDE_WAIT, "no master: both nodes are slaves, and this replica lacks "
                                 "the peer's newest snapshot: the peer takes over if it "
                                 "holds this one's; if not, they diverged: run 'promote' on "
                                 "the node that holds the newest data")


def _decide_starting_master(f: Facts, t: Timing) -> Decision:
    if peer_alive(f, t) and f.peer_role == ROLE_MASTER:
        if (f.peer_epoch or 0) > f.epoch:
            return Decision(DECIDE_DEMOTE, "the peer is master with a newer epoch (%d > %d)"
                            % (f.peer_epoch, f.epoch))
        if f.peer_serving:
            return Decision(DECIDE_SPLIT_BRAIN, "both nodes claim master (epochs %d and %s)"
                            % (f.epoch, f.peer_epoch))
        return Decision(DECIDE_RESUME, "both nodes start as master; this one has the "
                                       "newer epoch (%d > %s)" % (f.epoch, f.peer_epoch))
    if peer_alive(f, t):
        return Decision(DECIDE_RESUME, "the peer is slave")
    if f.peer_claim_epoch is not None and f.peer_claim_epoch > f.epoch:
        return Decision(DECIDE_WAIT, "the peer's heartbeats say it is master with a newer "
                                     "epoch (%d > %d) but it does not hear this node: not "
                                     "resuming" % (f.peer_claim_epoch, f.epoch))
    if f.witness is not None and f.witness <= 0 and f.uptime >= t.startup_wait:
        return Decision(DECIDE_WAIT, "the peer is silent and this node does not hold the "
                                     "witness's lease: it may be the isolated one")
    if f.uptime >= t.startup_wait:
        return Decision(DECIDE_RESUME, "the peer is silent: serving alone; replication "
                                       "and failover are suspended until it returns")
    return Decision(DECIDE_WAIT, "starting: listening for the peer")


def _decide_serving_master(f: Facts, t: Timing) -> Decision:
    if (not peer_alive(f, t) and f.peer_claim_epoch is not None
            and f.peer_claim_epoch > f.epoch):
        # the peer took over while it could not hear us, and we still hear
        # it: the safe direction is ours to take
        return Decision(DECIDE_STEP_DOWN, "the peer's heartbeats say it is master with a "
                                          "newer epoch (%d > %d) but it does not hear this "
                                          "node (one direction of the link is lost)"
                        % (f.peer_claim_epoch, f.epoch))
    # then: isolation_time is shorter than dead_time on purpose
    if f.arbitrator is False and f.peer_silence >= t.isolation_time:
        return Decision(DECIDE_STEP_DOWN, "isolated: neither the peer nor the arbitrator "
                                          "answers for %.1f s" % f.peer_silence)
    step_down = _witness_step_down(f, t)
    if step_down is not None:
        return step_down
    if peer_alive(f, t):
        if f.peer_role == ROLE_MASTER:
            if not f.peer_serving and (f.peer_epoch or 0) < f.epoch:
                return Decision(DECIDE_WAIT, "the peer, a former master of epoch %s, is "
                                             "starting: it yields to epoch %d"
                                % (f.peer_epoch, f.epoch))
            return Decision(DECIDE_SPLIT_BRAIN, "both nodes serve as master (epochs %d and %s)"
                            % (f.epoch, f.peer_epoch))
        if f.operator_handover:
            return Decision(DECIDE_HANDOVER, "the operator asked for a switchover ('demote')")
        if f.peer_requests_handover:
            return Decision(DECIDE_HANDOVER, "the peer's operator asked for a switchover "
                                             "('promote')")
        if f.service_failures >= t.check_failures:
            if not f.peer_up_to_date:
                return Decision(DECIDE_WAIT, "the service check failed %d times, but the "
                                             "slave is not up to date" % f.service_failures)
            if f.since_role_change < t.hold_down:
                return Decision(DECIDE_WAIT, "the service check failed %d times, but the role "
                                             "moved %.0f s ago (hold-down %g s)"
                                % (f.service_failures, f.since_role_change, t.hold_down))
            return Decision(DECIDE_HANDOVER, "the service check failed %d times in a row"
                            % f.service_failures)
        return Decision(DECIDE_WAIT, "serving")
    return Decision(DECIDE_WAIT, "serving alone: the peer is silent; replication and "
                                 "failover are suspended until it returns")


# -- the witness's lease ------------------------------------------------------
#
# A witness (a third machine running 'flocker_failover.py witness') lends
# one lease per cluster, to one node at a time.  Each side times it on its
# own monotonic clock, and each assumes the worse case:
#
#   node      sends request at s ........ its lease ends at s + L
#   witness        answers at a >= s .... it ends at a + L; another node
#                                         gets it only after a + L + margin
#
# The serving master renews every heartbeat_interval.  While its peer is
# silent it keeps serving only as long as more than witness_lead (half a
# lease) is left; so an isolated master has stopped serving at the latest
# at s + L/2, and its slave can promote at the earliest at s + L + margin
# (it promotes only holding the lease).  While the two hear each other
# nothing depends on the witness.  A node that was stalled (its loop
# stopped) drops what it held: a suspended machine's monotonic clock may
# not have counted the pause.

def witness_margin(lease: float) -> float:
    """How long the witness waits, after a lease ran out by its clock,
    before it lends it to another node: clock rates differ a little, and
    an answer takes a while to arrive."""
    return max(1.0, lease / 10)


def witness_lead(lease: float) -> float:
    """A master whose peer is silent steps down with this much of its lease
    left (see witness_timing_problem for why half)."""
    return lease / 2


def wants_lease(role: str, peer_state: str) -> bool:
    """Does this node ask the witness for its lease (else only about it)?
    A master always (it renews); a slave only once its peer is judged dead
    (not while it is still "unknown" at start-up: a slave that took the
    lease before its master's first renewal would only delay that master's)."""
    return role == ROLE_MASTER or peer_state == "dead"


def _witness_step_down(f: Facts, t: Timing) -> Optional[Decision]:
    """The serving master's witness rule (None: it does not apply).  Like
    the arbitrator's, it counts the silence from isolation_time, shorter
    than dead_time on purpose."""
    if f.witness is None or f.peer_silence < t.isolation_time or f.witness >= t.witness_lead:
        return None
    if f.witness_other:
        return Decision(DECIDE_STEP_DOWN, "the witness lent its lease to the peer, which "
                                          "is silent for %.1f s" % f.peer_silence)
    return Decision(DECIDE_STEP_DOWN, "the witness's lease was not renewed (%.1f s left) "
                                      "and the peer is silent for %.1f s"
                    % (f.witness, f.peer_silence))


@record
class LeaseAnswer:
    """What the witness answers one request (see LeaseBook.request)."""
    answer: int              # WITNESS_GRANTED, _HELD, _WAITING or _REFUSED
    lease: float = 0.0       # granted: its length
    wait: float = 0.0        # held or waiting: seconds until the asker may get it
    holder: str = ""         # held: who holds it; refused: why
    persist: bool = False    # the record changed: write it down before answering


class _ClusterLease:
    def __init__(self) -> None:
        self.holder = None          # type: Optional[str]
        self.expires = float("-inf")  # the holder's lease, by the witness's clock
        self.lease = 0.0            # the longest lease granted to the holder since it got it
        self.last = {}              # type: Dict[str, Tuple[int, int]]  # per node


class LeaseBook:
    """The witness's ledger: who holds each cluster's lease until when.  No
    I/O and no clock of its own (callers pass monotonic `now`).

    saved: what the state file held when the witness started (see
    record()), or None when there was none.  A restarted witness cannot
    know how long ago it answered: it counts each recorded holder's lease
    as granted again at the restart (so no other node gets it for a lease
    plus the margin, while the holder may renew it at once), and without a
    state file it lends nothing to anyone for max_lease plus the margin."""

    def __init__(self, max_lease: float, now: float, saved: Optional[dict]) -> None:
        self.max_lease = max_lease
        self.clusters = {}   # type: Dict[str, _ClusterLease]
        self.blocked_until = (now + max_lease + witness_margin(max_lease)
                              if saved is None else float("-inf"))
        for name, rec in (saved or {}).items():
            c = self.clusters[name] = _ClusterLease()
            c.holder = rec.get("holder") or None
            c.lease = float(rec.get("lease") or 0.0)
            c.expires = now + c.lease if c.holder else float("-inf")
            c.last = {n: (int(g), int(q)) for n, (g, q) in (rec.get("nodes") or {}).items()}

    def record(self) -> dict:
        """What must survive a restart, as JSON-able data."""
        return {name: {"holder": c.holder, "lease": c.lease,
                       "nodes": {n: list(v) for n, v in sorted(c.last.items())}}
                for name, c in sorted(self.clusters.items())}

    def request(self, cluster: str, node: str, generation: int, sequence: int,
                lease: float, now: float) -> Optional[LeaseAnswer]:
        """Node asks for (lease > 0) or about (lease 0) the cluster's lease.
        None: not fresh (a replay): no answer at all."""
        c = self.clusters.setdefault(cluster, _ClusterLease())
        if (generation, sequence) <= c.last.get(node, (0, 0)):
            return None
        c.last[node] = (generation, sequence)
        if lease > self.max_lease:
            return LeaseAnswer(WITNESS_REFUSED, holder="a lease of %g s was asked for; this "
                               "witness lends at most %g s (its --max-lease)"
                               % (lease, self.max_lease))
        if c.holder == node and lease > 0:
            grew = lease > c.lease
            c.lease = max(c.lease, lease)
            c.expires = max(c.expires, now + lease)
            return LeaseAnswer(WITNESS_GRANTED, lease, persist=grew)
        held_until = c.expires + witness_margin(c.lease) if c.holder else float("-inf")
        free_at = max(held_until, self.blocked_until)
        if c.holder == node or now < free_at or lease <= 0:
            if now < held_until:
                return LeaseAnswer(WITNESS_HELD, wait=free_at - now, holder=c.holder or "")
            if now < free_at:
                return LeaseAnswer(WITNESS_WAITING, wait=free_at - now)
            return LeaseAnswer(WITNESS_HELD, holder="")    # a question: nobody holds it
        c.holder, c.lease, c.expires = node, lease, now + lease
        return LeaseAnswer(WITNESS_GRANTED, lease, persist=True)


class WitnessView:
    """The lease as one node knows it, from the witness's answers.  No I/O
    and no clock of its own (callers pass monotonic times)."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.expires = None        # type: Optional[float]  # own clock: request sent + lease
        self.answer = None         # type: Optional[WitnessMessage]  # the newest answer
        self.answered_at = None    # type: Optional[float]
        self.failed_at = None      # type: Optional[float]
        self.error = ""            # why the newest request got no answer
        self.lost_at = float("-inf")  # answers to requests sent before this are void
        self.rejected = 0          # datagrams that were not the awaited answer
        self.grants = 0

    def answered(self, sent_at: float, m: WitnessMessage, now: float) -> None:
        if sent_at < self.lost_at:
            return
        self.answer, self.answered_at, self.error = m, now, ""
        if m.answer == WITNESS_GRANTED and m.lease_ms > 0:
            self.grants += 1
            self.expires = max(self.expires or sent_at, sent_at + m.lease_ms / 1000.0)
        elif m.answer == WITNESS_HELD and m.holder not in ("", self.me):
            self.expires = None

    def failed(self, error: str, now: float) -> None:
        self.failed_at, self.error = now, error

    def lost(self, now: float) -> None:
        """This node was stalled: whatever it held is gone."""
        self.expires, self.lost_at = None, now

    def left(self, now: float) -> float:
        return 0.0 if self.expires is None else max(0.0, self.expires - now)

    def other_holds(self) -> bool:
        a = self.answer
        return bool(a is not None and a.answer == WITNESS_HELD and a.holder not in ("", self.me)
                    and (self.failed_at is None or self.answered_at > self.failed_at))

    def reachable(self, now: float, within: float) -> bool:
        return self.answered_at is not None and now - self.answered_at <= within


# -- the divergence verdict ---------------------------------------------------
#
# Both hosts compute it on their own from the same facts (exchanged between
# them) and must reach the same answer: verdict(a, b) == verdict(b, a).

POLICIES = _POLICIES
PREFER_NODE = "prefer-node:"

VERDICT_RESOLVED = "resolved"          # winner continues, loser preserves and resyncs
VERDICT_OPERATOR = "operator"          # nothing automatic: an operator must decide
VERDICT_MISMATCH = "policy-mismatch"   # the nodes are configured differently


@record
class Side:
    """One node's facts about a divergence, as both nodes see them."""
    node: str
    epoch: int
    policy: str          # this node's divergence_policy
    changes: int         # bytes written since the newest common snapshot (0: none)
    serving: bool = False  # it ran the user system as master when the attempt began
    recursive: bool = False  # its configuration says recursive = yes (child datasets)


@record
class Verdict:
    status: str
    winner: Optional[str]
    loser: Optional[str]
    preserve: bool       # the loser has changes of its own that must be kept
    reason: str
    # the node that would lose and has changes that the tool cannot keep
    # (recursive = yes): the operator keeps them by hand
    kept_by_hand: Optional[str] = None


def resolved(w: Side, loser: Side, why: str) -> Verdict:
    """w continues, unless the loser changed something and the nodes have
    recursive = yes: keeping the divergent data of a dataset with child
    datasets (preserve_divergence) is not done by the tool, so that
    verdict goes to the operator, the same on both nodes, before the
    loser stops (README, "Divergent data").  Of two serving masters the
    older one has stopped already (split_brain_yields()), so that one
    writes while the operator is away."""
    if loser.changes > 0 and (w.recursive or loser.recursive):
        return Verdict(VERDICT_OPERATOR, None, None, False,
                       "%s would win (%s), but %s changed %d bytes since the common "
                       "snapshot and must keep them, and flocker-failover does not keep "
                       "the divergent data of datasets with recursive = yes: no data was "
                       "changed on either node, and only a serving master of the older "
                       "epoch stopped its user system; an operator decides"
                       % (w.node, why, loser.node, loser.changes), kept_by_hand=loser.node)
    return Verdict(VERDICT_RESOLVED, w.node, loser.node, loser.changes > 0,
                   "%s wins: %s" % (w.node, why))


def is_split_brain(a: Side, b: Side) -> bool:
    """Both served as master, or both changed: a split brain.  Otherwise
    a node that was away (judged dead and replaced, or stepped down)
    rejoins the one that serves, or one side alone changed."""
    return (a.serving and b.serving) or (a.changes > 0 and b.changes > 0)


def verdict(a: Side, b: Side) -> Verdict:
    """Which side's data continues.  Symmetric in its arguments.

    A node that serves continues, whatever the policy, when the other did
    not serve as the attempt began: that one was judged dead and replaced
    (or stepped down) and rejoins as slave, its own changes kept.  Then a
    change on one side only continues; no change on either side continues
    the newer epoch; only when both served and both changed does the
    policy decide."""
    a, b = sorted((a, b), key=lambda s: s.node)   # the same order on both hosts

    def won(w: Side, why: str) -> Verdict:
        return resolved(w, b if w is a else a, why)

    def tie_break(why: str) -> Verdict:
        if a.epoch != b.epoch:
            return won(a if a.epoch > b.epoch else b, why + "; the newer epoch breaks the tie")
        return won(a, why + "; the first node by name breaks the tie")

    if a.serving != b.serving:
        w, r = (a, b) if a.serving else (b, a)
        return won(w, "it serves, and %s rejoins it as slave (it was away: judged dead "
                      "and replaced, or stepped down)%s"
                   % (r.node, "; %s's own %d bytes are kept" % (r.node, r.changes)
                      if r.changes else ""))
    if a.policy != b.policy:
        return Verdict(VERDICT_MISMATCH, None, None, False,
                       "the nodes disagree on divergence_policy (%s: %s, %s: %s); fix the "
                       "configuration, nothing is resolved automatically"
                       % (a.node, a.policy, b.node, b.policy))
    policy = a.policy
    if (a.changes > 0) != (b.changes > 0):
        w = a if a.changes > 0 else b
        return won(w, "only %s changed since the common snapshot (%d bytes); nothing is lost"
                   % (w.node, w.changes))
    if a.changes == 0:
        return tie_break("neither side changed since the common snapshot")
    if policy == "manual":
        return Verdict(VERDICT_OPERATOR, None, None, False,
                       "both sides changed (%s: %d bytes, %s: %d bytes) and "
                       "divergence_policy = manual: an operator decides"
                       % (a.node, a.changes, b.node, b.changes))
    if policy == "zero-changes-only":
        return Verdict(VERDICT_OPERATOR, None, None, False,
                       "both sides changed (%s: %d bytes, %s: %d bytes) and "
                       "divergence_policy = zero-changes-only: an operator decides"
                       % (a.node, a.changes, b.node, b.changes))
    if policy == "most-changes":
        if a.changes == b.changes:
            return tie_break("both changed %d bytes" % a.changes)
        w = a if a.changes > b.changes else b
        return won(w, "it changed more (%d bytes against %d)"
                   % (w.changes, min(a.changes, b.changes)))
    if policy in ("newest-master", "oldest-master"):
        if a.epoch == b.epoch:
            return tie_break("both have epoch %d" % a.epoch)
        newer, older = (a, b) if a.epoch > b.epoch else (b, a)
        if policy == "newest-master":
            return won(newer, "newest-master: epoch %d is newer than %d" % (newer.epoch, older.epoch))
        return won(older, "oldest-master: epoch %d is older than %d" % (older.epoch, newer.epoch))
    if policy.startswith(PREFER_NODE):
        name = policy[len(PREFER_NODE):]
        for side in (a, b):
            if side.node == name:
                return won(side, "divergence_policy prefers node %s" % name)
        return Verdict(VERDICT_OPERATOR, None, None, False,
                       "divergence_policy prefers node %s, which is neither %s nor %s"
                       % (name, a.node, b.node))
    return Verdict(VERDICT_OPERATOR, None, None, False,
                   "unknown divergence_policy %r: an operator decides" % policy)


# -- which replica is newer (for a cluster manager's promotion scores) --------

RELATION_SAME = "same"            # both newest snapshots are the same (by GUID)
RELATION_AHEAD = "ahead"          # this node holds the peer's newest snapshot and more
RELATION_BEHIND = "behind"        # the peer holds this node's newest snapshot and more
RELATION_DIVERGED = "diverged"    # each holds a snapshot the other lacks
RELATION_NO_REPLICA = "no-replica"  # this node holds no snapshot (the peer may)
RELATION_PEER_EMPTY = "peer-empty"  # the peer holds no snapshot, this node does


def replica_relation(local: Optional[Listing], remote: Optional[Listing]) -> str:
    """How this node's snapshots stand to the peer's, by GUID (pure): what
    'compare' prints and what contrib/ocf/flocker scores promotion by.
    Unsnapshotted writes do not count here (a slave's replica has none)."""
    mine = local.snaps if local is not None else ()
    theirs = remote.snaps if remote is not None else ()
    if not mine:
        return RELATION_SAME if not theirs else RELATION_NO_REPLICA
    if not theirs:
        return RELATION_PEER_EMPTY
    if mine[-1].guid == theirs[-1].guid:
        return RELATION_SAME
    if theirs[-1].guid in local.guids:
        return RELATION_AHEAD
    if mine[-1].guid in remote.guids:
        return RELATION_BEHIND
    return RELATION_DIVERGED


# ===========================================================================
# 7. Actions
# ===========================================================================


@record(mutable=True)
class ReplicationResult:
    snapshot: str            # newest snapshot the slave now has
    guid: str
    base: Optional[str]      # the common snapshot the send started from
    sent: List[str]          # snapshots that arrived in this cycle
    bytes: int
    seconds: float
    pruned_local: List[str]
    pruned_peer: List[str]
    message: str


def ssh_control_dir(cfg: Config) -> str:
    """Private directory beside the state file for the ssh master sockets."""
    return os.path.join(os.path.dirname(cfg.local.state_db) or ".", "ssh-control")


def peer_zfs(cfg: Config) -> RemoteZfs:
    return RemoteZfs(Ssh(cfg, cfg.peer, ssh_control_dir(cfg)))


def replicate_once(cfg: Config, store: StateStore, zfs: ZfsBase, peer: ZfsBase,
                   clock=None, stop: Optional[threading.Event] = None,
                   progress: Optional[TransferProgress] = None) -> ReplicationResult:
    """One replication cycle, master -> slave; the sync command and the
    daemon both call this.  Records the cycle in the state store; raises a
    FlockerError (recorded as well) when it was refused or failed.  clock:
    what names the snapshots and times the record (wall_clock)."""
    clock = wall_clock if clock is None else clock
    st = store.initialised_state()
    if st.role != ROLE_MASTER:
        raise ReplicationError(
            "this node (%s) is %s: replication runs on the master only; run sync "
            "on %s" % (cfg.local.name, st.role, cfg.peer.name))
    started = clock()
    if isinstance(peer, RemoteZfs):
        peer.ssh.stop = stop      # ending the cycle ends its waits on the network
    rid = store.begin_replication(started)      # (and what a dead process left)
    try:
        result = _cycle(cfg, store, zfs, peer, st, rid, clock, stop, progress)
    except FlockerError as e:
        store.update_replication(rid, result="failed", finished=clock(),
                                 seconds=round(clock() - started, 3), error=e.message)
        raise
    except BaseException as e:
        store.update_replication(rid, result="failed", finished=clock(),
                                 error="internal error: %r" % (e,))
        raise
    store.update_replication(rid, trim=True, result="ok", finished=clock(),
                             snapshot=result.snapshot, guid=result.guid, base=result.base,
                             bytes=result.bytes, seconds=round(clock() - started, 3))
    return result


def _cycle(cfg, store, zfs, peer, st, rid, clock, stop=None, progress=None
           ) -> ReplicationResult:
    """The steps of one replication cycle, in this order, each a function
    below: 1. what the peer has (snapshotting on while it is away); 2. the
    newest common snapshot, refusing what is unsafe; 3. a snapshot when
    something changed, and the increment sent; 4. the new common snapshot
    held on both sides, only then the previous holds released; 5.
    retention, the slave first.  Where one side's step does not wait for
    the other's, the two run at the same time (_together): the listings of
    step 1, the holds of step 4, then its releases, and this master's
    listing for retention while the slave prunes."""
    local, remote = _together(lambda: _own_listing(cfg, zfs, st),
                              lambda: _peer_listing(peer, cfg.peer.dataset))
    side = _peer_side(cfg, store, zfs, peer, st, local, remote, clock, stop)
    common = _safe_common(cfg, peer, st, local, side.remote)
    local = _snapshot_if_changed(cfg, zfs, local, st.epoch, clock, hooks=True)
    target = local.snaps[-1]
    common, sent, nbytes, seconds = _send_increment(cfg, store, zfs, peer, rid, local,
                                                    target, common, side.ptree, stop,
                                                    progress)
    arrived = side.resumed_snaps + sent
    after, got = _arrived(cfg, peer, target, side.remote, relist=bool(sent))
    old = _hold_then_release(cfg, zfs, peer, local, target, after, got, arrived)
    pruned_peer, pruned_local = _retention(cfg, store, zfs, peer, local, target, after,
                                           relist=bool(old or arrived or
                                                       target.userrefs == 0))
    msg = _cycle_message(cfg, side, target, common, sent, nbytes, seconds)
    if side.resumed is not None:
        nbytes, seconds = nbytes + side.resumed.bytes, seconds + side.resumed.seconds
    return ReplicationResult(target.name, target.guid, common.name if common else None,
                             arrived, nbytes, seconds, pruned_local, pruned_peer, msg)


def _own_listing(cfg, zfs: ZfsBase, st: NodeState) -> Listing:
    """This master's dataset, its flocker:role marker set (a replica of it
    then names its master)."""
    me = cfg.local
    local = zfs.listing(me.dataset)
    if local is None:
        raise ReplicationError(
            "the dataset %s does not exist on this master (%s): nothing to "
            "replicate; check [node %s] dataset in %s" % (me.dataset, me.name, me.name,
                                                         cfg.path))
    marker = role_marker(me.name, ROLE_MASTER, st.epoch)
    if local.props.get(ROLE_PROPERTY) != marker:
        zfs.set_prop(me.dataset, ROLE_PROPERTY, marker)
    return local


def _together(here, there):
    """here() on this thread (the replication job's) while there() runs on
    a helper thread: the cycle waits for the slower of the two, not for
    both one after the other (one side's zfs on this node, the other's on
    the peer).  Returns (here's result, there's result) once both ended;
    raises only then, so nothing of a failed cycle still runs after it,
    and here's exception before there's."""
    box = {}        # the helper thread's result or exception

    def helper():
        try:
            box["result"] = there()
        except BaseException as e:     # handed to this thread, raised there
            box["error"] = e
    thread = threading.Thread(target=helper, name="replicate-together", daemon=True)
    thread.start()
    try:
        mine = here()
    finally:
        thread.join()
    if "error" in box:
        raise box["error"]
    return mine, box["result"]


def _run_many_both(zfs: ZfsBase, here: List[List[str]], peer: ZfsBase,
                   there: List[List[str]]) -> Tuple[List[Tuple[int, str]],
                                                   List[Tuple[int, str]]]:
    """zfs.run_many(here) and peer.run_many(there), at the same time when
    both have commands."""
    if here and there:
        return _together(lambda: zfs.run_many(here), lambda: peer.run_many(there))
    return zfs.run_many(here), peer.run_many(there)


def _peer_listing(peer: ZfsBase, pds: str):
    """The replica's live listing for step 1 (None: there is none), or the
    SshError saying the peer cannot be reached (returned, not raised: the
    snapshots go on while it is away, which needs this master's listing)."""
    try:
        return peer.listing(pds)
    except SshError as e:
        return e


@record(mutable=True)
class _PeerSide:
    """What step 1 of a cycle learnt of the peer's replica."""
    remote: Optional[Listing]          # None: there is none yet
    resumed: Optional[TransferOutcome] = None  # an interrupted transfer finished first
    resumed_snaps: List[str] = field(default_factory=list)
    ptree: Dict[str, TreeNode] = field(default_factory=dict)  # recursive
    dropped: List[str] = field(default_factory=list)  # partials dropped


def _peer_side(cfg, store, zfs, peer, st, local: Listing, remote, clock, stop
               ) -> _PeerSide:
    """Step 1: what the peer has, from a live listing (one round trip,
    taken with this master's own: _peer_listing).  Refuses a peer whose
    replica says it is master; finishes an interrupted resumable transfer
    first; with recursive = yes, reads the replica's tree and drops a
    child's partial receive.  A peer that cannot be reached (remote is the
    SshError): the snapshots go on (_snapshot_while_away)."""
    other, pds = cfg.peer, cfg.peer.dataset
    if isinstance(remote, SshError):
        _snapshot_while_away(cfg, store, zfs, st, local, clock)
        raise remote
    side = _PeerSide(remote)
    if remote is None:
        _check_peer_parent(peer, pds, other.name)
        return side
    claim = parse_role_marker(remote.props.get(ROLE_PROPERTY))
    if claim is not None and claim[0] == other.name and claim[1] == ROLE_MASTER:
        raise ReplicationError(
            "%s says it is master (%s=%r on %s; this node is master in epoch %d): "
            "refusing to send, two masters is a split brain; nothing was changed "
            "on either node. Decide which node stays master before replicating "
            "again" % (other.name, ROLE_PROPERTY, remote.props.get(ROLE_PROPERTY),
                       pds, st.epoch))
    side.resumed = _resume_partial(cfg, zfs, peer, remote, stop)
    if side.resumed is not None:
        had = remote.guids
        side.remote = peer.listing(pds)
        if side.remote is None:
            raise ReplicationError("%s vanished on %s after resuming its receive"
                                   % (pds, other.name))
        side.resumed_snaps = [s.name for s in side.remote.snaps if s.guid not in had]
    if cfg.recursive:
        side.ptree = peer.tree(pds)
        side.dropped = _drop_child_partials(cfg, peer, side.ptree)
        if side.dropped:
            side.ptree = peer.tree(pds)
    return side


def _snapshot_while_away(cfg, store, zfs, st, local: Listing, clock) -> None:
    """The peer is away: keep taking snapshots, bounded by retention that
    spares the newest, the held ones, the last one known replicated and
    every one a transfer since then may have delivered unconfirmed (the
    peer may hold it: pruned here, it would look like history this master
    lacks, a divergence)."""
    ds = cfg.local.dataset
    local = _snapshot_if_changed(cfg, zfs, local, st.epoch, clock, hooks=True)
    last_ok = store.replication_summary()["last_ok"]
    protect = ([local.snaps[-1].name] + ([last_ok["snapshot"]] if last_ok else [])
               + store.unconfirmed_targets())
    _prune(zfs, ds, local, cfg.snapshot_keep, protect + preserved_origins(store, ds),
           cfg.recursive)


def _safe_common(cfg, peer, st, local: Listing, remote: Optional[Listing]) -> Optional[Snap]:
    """Step 2: the newest common snapshot, by GUID (None: the peer has no
    replica, a full copy goes).  Refuses what is unsafe: a replica without
    a snapshot or without one in common, snapshots after the common one
    (foreign ones, this master's own lost ones, or a divergence), a replica
    written to since its newest snapshot."""
    if remote is None:
        return None
    ds, pds, other = cfg.local.dataset, cfg.peer.dataset, cfg.peer.name
    if not remote.snaps:
        raise ReplicationError(
            "%s exists on %s but has no snapshot, so it shares none with %s here: "
            "flocker-failover never overwrites it; nothing was changed. If it holds "
            "nothing you need, rename it away on %s ('zfs rename %s %s-old') and "
            "sync again for a full copy" % (pds, other, ds, other, pds, pds))
    common = find_common(local, remote)
    if common is None:
        raise ReplicationError(
            "%s on %s shares no snapshot with %s here (compared by GUID), so no "
            "incremental send is possible and flocker-failover will not overwrite "
            "it; nothing was changed. If it holds nothing you need, rename it away "
            "on %s ('zfs rename %s %s-old') and sync again for a full copy; if it "
            "does, the nodes have diverged: decide which data is right first"
            % (pds, other, ds, other, pds, pds))
    extra = snaps_after(remote, common.guid)
    ours = [s for s in extra if is_flocker_snapshot(s.name)]
    if extra and not ours:
        raise ReplicationError(foreign_snapshots_message(cfg, extra, common.name))
    if ours and all(snapshot_epoch(s.name) == st.epoch for s in ours):
        raise ReplicationError(lost_own_snapshots_message(cfg, extra, common.name,
                                                          st.epoch))
    if extra:
        raise DivergenceError(
            "%s on %s has %d snapshot(s) newer than the newest common snapshot %s "
            "(%s): it has history this master lacks (divergence); nothing was "
            "changed. Decide which node's data continues before replicating"
            % (pds, other, len(extra), common.name,
               ", ".join(s.name for s in extra[:5])))
    pf = peer.features()
    if pf.written and remote.props.get("written", "0") not in ("0", "-", ""):
        raise DivergenceError(
            "the replica %s on %s was changed there since its newest snapshot %s "
            "(written=%s bytes); it was not rolled back and nothing was sent. Copy "
            "out what you need from it on %s, then run there 'zfs rollback %s@%s' "
            "and sync again" % (pds, other, common.name,
                                remote.props.get("written"), other, pds,
                                remote.snaps[-1].name))
    return common


def _send_increment(cfg, store, zfs, peer, rid, local: Listing, target: Snap,
                    common: Optional[Snap], ptree, stop, progress
                    ) -> Tuple[Optional[Snap], List[str], int, float]:
    """Step 3: send what the peer lacks up to target, from the common
    snapshot (with recursive = yes, from the newest one every dataset of
    the replica's tree holds: _tree_base).  Returns (the base it was sent
    from, the snapshots sent, bytes, seconds); nothing is sent when the
    peer has the target already."""
    behind = None     # recursive = yes: the top's common snapshot a child lacks
    if cfg.recursive and common is not None:
        base_snap = _tree_base(cfg, zfs, local, common, ptree)
        behind, common = (common if base_snap.guid != common.guid else None), base_snap
    if common is not None and common.guid == target.guid:
        return common, [], 0, 0.0
    base = common.name if common else None
    store.update_replication(rid, base=base, snapshot=target.name)
    try:
        sent, nbytes, seconds = _send(cfg, zfs, peer, local, target, base, stop, progress)
    except ReplicationError as e:
        if behind is None:
            raise
        pds = cfg.peer.dataset
        raise type(e)(
            "%s. (A package stream cut on its way left a child of %s on %s without "
            "%s, so this one was sent from %s, which every dataset there holds; a "
            "zfs recv that cannot skip the snapshots the replica already has "
            "(zfs-fuse) refuses it: rename the replica away on %s ('zfs rename %s "
            "%s-old') and sync again for a full copy)"
            % (e.message.rstrip("."), pds, cfg.peer.name, behind.name, base,
               cfg.peer.name, pds, pds)) from None
    failpoint("replicate:sent")
    return common, sent, nbytes, seconds


def _arrived(cfg, peer, target: Snap, remote: Optional[Listing], relist: bool
             ) -> Tuple[Listing, Snap]:
    """The peer's replica after the transfer, and the target in it: the
    transfer counts as done only when the target is there with its GUID.
    relist: something was sent, list the replica again; else the live
    listing of step 1 (remote) shows the target already."""
    pds = cfg.peer.dataset
    after = peer.listing(pds) if relist else remote
    got = after.snap(target.name) if after else None
    if got is None or got.guid != target.guid:
        raise ReplicationError(
            "after the transfer, %s@%s on %s %s; the transfer is not counted as done"
            % (pds, target.name, cfg.peer.name,
               "is missing" if got is None else
               "has GUID %s instead of %s" % (got.guid, target.guid)))
    return after, got


def _hold_then_release(cfg, zfs, peer, local: Listing, target: Snap, after: Listing,
                       got: Snap, arrived: List[str]) -> List[str]:
    """Step 4, confirmed: hold the new common snapshot on both sides, then
    release the previous holds; keep the replica read-only.  The two holds
    run at the same time, then the two releases (_run_many_both): no
    release before both holds are in place.  A cycle that changed nothing
    finds all of this done and runs no command.  Returns the names this
    master released."""
    ds, pds, r = cfg.local.dataset, cfg.peer.dataset, cfg.recursive
    old = [s.name for s in local.snaps if s.userrefs > 0 and s.name != target.name]
    # (userrefs counts every tag: a snapshot just sent is held with ours
    # whatever else holds it, e.g. a hold zfs-fuse leaked for a killed send)
    mine = hold_commands(ds, [target.name], r) if (arrived or target.userrefs == 0) else []
    cmds = hold_commands(pds, [target.name], r) if (arrived or got.userrefs == 0) else []
    if after.props.get("readonly") != "on":
        cmds.append(["set", "readonly=on", pds])
    held_here, held_there = _run_many_both(zfs, mine, peer, cmds)
    _check_holds(zfs, held_here)
    _check_holds(peer, held_there)
    # only now that the new common snapshot is held on both sides
    peer_old = [s.name for s in after.snaps if s.userrefs > 0 and s.name != target.name]
    done_here, done_there = _run_many_both(zfs, release_commands(ds, old, r), peer,
                                           release_commands(pds, peer_old, r))
    _check_releases(peer, done_there)
    _check_releases(zfs, done_here)
    return old


def _retention(cfg, store, zfs, peer, local: Listing, target: Snap, after: Listing,
               relist: bool) -> Tuple[List[str], List[str]]:
    """Step 5: retention, the slave first, never its common snapshot (the
    target) or anything after it; snapshots just released are pruned next
    cycle.  relist: this master's holds changed, list it again first (while
    the slave prunes), unless retention could destroy nothing here even
    with every hold released (a hold never adds a snapshot to destroy).
    Returns (pruned on the peer, pruned here)."""
    ds, pds, r = cfg.local.dataset, cfg.peer.dataset, cfg.recursive
    keep_peer = [s.name for s in snaps_after(after, target.guid)] + [target.name]
    protect = [target.name] + preserved_origins(store, ds)
    unheld = [replace(s, userrefs=0) for s in local.snaps]
    if relist and plan_prune(unheld, cfg.snapshot_keep, protect):
        pruned_peer, fresh = _together(
            lambda: _prune(peer, pds, after, cfg.snapshot_keep, keep_peer, r),
            lambda: zfs.listing(ds))
        local = fresh or local
    else:
        pruned_peer = _prune(peer, pds, after, cfg.snapshot_keep, keep_peer, r)
    pruned_local = _prune(zfs, ds, local, cfg.snapshot_keep, protect, r)
    return pruned_peer, pruned_local


def _cycle_message(cfg, side: _PeerSide, target: Snap, common: Optional[Snap],
                   sent: List[str], nbytes: int, seconds: float) -> str:
    """What a cycle did, in one line for the log and 'sync'."""
    said = []
    if side.dropped:
        said.append("dropped the partial receive of %s (a stream cut inside it; "
                    "sent again)" % ", ".join(side.dropped))
    if side.resumed is not None:
        said.append("resumed the interrupted transfer of %s (%d bytes in %.2f s)"
                    % (", ".join(side.resumed_snaps) or "a stream", side.resumed.bytes,
                       side.resumed.seconds))
    if sent:
        said.append("sent %s (%d bytes in %.2f s, from %s)"
                    % (", ".join(sent), nbytes, seconds,
                       common.name if common else "nothing: full copy"))
    return ("%s: %s" % (cfg.peer.name, "; ".join(said)) if said else
            "%s is up to date (%s)" % (cfg.peer.name, target.name))


def _drop_child_partials(cfg, peer: ZfsBase, ptree: Dict[str, TreeNode]) -> List[str]:
    """recursive = yes: a package (-R) stream cut inside a child of the
    replica left a partial receive there (OpenZFS recv -s: a token on that
    child).  Resuming it would finish only that child's part, so it is
    dropped: 'zfs recv -A' of the child (only the part of a stream whose
    whole is on this master; a child's first receive, never complete,
    goes), and the cycle sends again from a snapshot that every dataset of
    the replica holds (_tree_base).  The top dataset's own partial receive
    is resumed instead (_resume_partial).  Returns the children."""
    dropped = []
    for name, node in sorted(ptree.items()):
        if name != cfg.peer.dataset and node.token:
            peer.run(["recv", "-A", name])
            dropped.append(name)
    return dropped


def tree_base(snaps: Sequence[Snap], common: Snap, ltree: Dict[str, TreeNode],
              ptree: Dict[str, TreeNode], ds: str, pds: str) -> Optional[Snap]:
    """The newest of snaps (the top dataset's, in order) up to common
    that the replica and every dataset below it hold with the same GUID as
    the same dataset here; None when there is none (pure).  A dataset of
    the replica that this side no longer has is not asked (a package
    stream leaves it alone)."""
    def everywhere(s: Snap) -> bool:
        for pname, pnode in ptree.items():
            lnode = ltree.get(ds + pname[len(pds):])
            if lnode is None:
                continue
            guid = lnode.snaps.get(s.name)
            if guid is None or pnode.snaps.get(s.name) != guid:
                return False
        return True
    upto = [s for s in snaps if s.order <= common.order]
    return next((s for s in reversed(upto) if everywhere(s)), None)


def _tree_base(cfg, zfs: ZfsBase, local: Listing, common: Snap,
               ptree: Dict[str, TreeNode]) -> Snap:
    """recursive = yes: the snapshot to send the package stream from.  The
    newest common one, unless a package stream cut on its way left a child
    of the replica without it (the top dataset's part arrived, the child's
    did not: zfs-fuse drops the child's part, OpenZFS keeps it as a partial
    receive that _drop_child_partials dropped): then the newest before it
    that every dataset of the replica holds; zfs recv skips the snapshots
    the replica already has (same GUID)."""
    ds, pds = local.dataset, cfg.peer.dataset
    base = tree_base(local.snaps, common, zfs.tree(ds), ptree, ds, pds)
    if base is None:
        raise ReplicationError(
            "no snapshot up to the newest common one %s is held, with the same GUID, by "
            "%s on %s and every dataset below it (recursive = yes): a child of the "
            "replica shares no snapshot with this master's, so no package stream can "
            "be received; nothing was sent and nothing was changed. Look at 'zfs list "
            "-r -t snapshot %s' on %s; a child that holds nothing you need can be "
            "renamed away there ('zfs rename %s/CHILD %s/CHILD-old'), and the next "
            "cycle sends it anew" % (common.name, pds, cfg.peer.name, pds, cfg.peer.name,
                                     pds, pds))
    if base.guid != common.guid:
        log.info("replication: a child of %s on %s lacks %s: sending from %s, the newest "
                 "snapshot every dataset there holds", pds, cfg.peer.name, common.name,
                 base.name)
    return base


def foreign_snapshots_message(cfg, foreign: Sequence[Snap], common: str) -> str:
    """The replica has snapshots after the common one that flocker-failover
    did not make (zfs-auto-snapshot, sanoid, an operator): no divergence
    (this node's history continues), but 'zfs recv' without -F takes an
    increment only onto the replica's newest snapshot, and nothing here
    destroys a snapshot it did not make: the operator decides."""
    pds, name = cfg.peer.dataset, cfg.peer.name
    names = [s.name for s in foreign]
    return ("%s on %s has %d snapshot(s) not made by flocker-failover after the newest "
            "common snapshot %s (%s): zfs receive takes an increment only onto the "
            "replica's newest snapshot, and flocker-failover never destroys snapshots it "
            "did not make, so nothing was sent and nothing was changed. On %s, copy out "
            "anything you need from them, then run %s; and keep snapshot "
            "tools off the replica (zfs-auto-snapshot: 'zfs set com.sun:auto-snapshot=false "
            "%s'; sanoid: no template for it): its snapshots come from the master"
            % (pds, name, len(names), common, ", ".join(names[:5]) +
               (", ..." if len(names) > 5 else ""), name, _destroy_hint(pds, names), pds))


def _destroy_hint(ds: str, names: Sequence[str]) -> str:
    """The commands an operator runs to destroy these snapshots (one each:
    zfs-fuse's destroy takes one snapshot at a time)."""
    return ", ".join("'zfs destroy %s@%s'" % (ds, n) for n in names[:5]) + (
        " and the same for the other %d" % (len(names) - 5) if len(names) > 5 else "")


def lost_own_snapshots_message(cfg, extra: Sequence[Snap], common: str, epoch: int) -> str:
    """The replica has flocker snapshots after the common one, all of this
    master's own epoch, which only this node takes while it is master: a
    transfer delivered them and its cycle never confirmed them, and this
    node no longer has them (its record of that transfer was lost, so
    retention pruned them).  An older state of this node's own data, not a
    divergent side: no resolution; the operator removes them."""
    pds, name = cfg.peer.dataset, cfg.peer.name
    names = [s.name for s in extra]
    return ("%s on %s has %d snapshot(s) after the newest common snapshot %s that were "
            "made by this master in its epoch %d and that it no longer has (%s): a "
            "transfer delivered them and was never confirmed, then this node pruned its "
            "own copies. They hold an older state of this node's data, not a divergence; "
            "but zfs receive takes an increment only onto the replica's newest snapshot, "
            "so nothing was sent and nothing was changed. On %s, copy out anything you "
            "need from them, then run %s and sync again"
            % (pds, name, len(names), common, epoch, ", ".join(names[:5]) +
               (", ..." if len(names) > 5 else ""), name, _destroy_hint(pds, names)))


def _check_holds(z: ZfsBase, results: List[Tuple[int, str]]) -> None:
    """A hold (or readonly=on) that failed fails the cycle, so the next one
    tries again; a hold that is already there is fine."""
    for rc, out in results:
        if rc != 0 and not zfs_says("hold_exists", out):
            raise ZfsError("could not hold the new common snapshot (or set the "
                           "replica read-only) %s: %s; the next cycle tries again"
                           % (z.where, _stderr_text(out)))


def _check_releases(z: ZfsBase, results: List[Tuple[int, str]]) -> None:
    """A release that failed leaves a snapshot held: safe, but say so."""
    for rc, out in results:
        if rc != 0 and not zfs_says("no_tag", out):
            log.warning("could not release an old hold %s: %s", z.where,
                        _stderr_text(out))


def _check_peer_parent(peer: ZfsBase, pds: str, name: str) -> None:
    """The replica is missing: a full send is fine when its parent exists."""
    pool, parent = pds.split("/")[0], pds.rsplit("/", 1)[0]
    (pool_rc, _), (parent_rc, _) = peer.run_many(
        [["list", "-H", "-o", "name", pool], ["list", "-H", "-o", "name", parent]])
    if pool_rc != 0:
        raise ReplicationError(
            "the pool %s of the replica %s does not exist on %s: import or create it "
            "there, or fix [node %s] dataset in the configuration; nothing was sent"
            % (pool, pds, name, name))
    if parent_rc != 0:
        raise ReplicationError(
            "the parent %s of the replica %s does not exist on %s: create it there "
            "with 'zfs create -p %s'; nothing was sent" % (parent, pds, name, parent))


def tree_changes(zfs: ZfsBase, ds: str, old: str, new: str, recursive: bool,
                 raw: bool = False) -> int:
    """The bytes this side changed from snapshot old to snapshot new: the
    size of the incremental stream, 0 when it carries no change (a measure
    zfs-fuse and OpenZFS give alike).  With recursive = yes, summed over
    the file systems and volumes below ds too (snapshot -r gave them the
    same snapshot names): a child made after old counts its whole stream,
    one made after new (no snapshot of that name) its referenced bytes;
    either is a change.  raw: the raw streams' (see changes_since)."""
    total = zfs.stream_size(ds, old, new, raw)
    if not recursive:
        return total
    for child in zfs.descendants(ds):
        if not zfs.exists("%s@%s" % (child, new)):
            total += max(1, int(zfs.get(child, ["referenced"]).get("referenced") or 1))
        else:
            total += zfs.stream_size(child, old if zfs.exists("%s@%s" % (child, old))
                                     else None, new, raw)
    return total


def changes_since(cfg, zfs: ZfsBase, old: str, new: str) -> int:
    """tree_changes() of this node's dataset, the divergence measure.  An
    encrypted dataset replicated raw (send_flags = -w, on both nodes) is
    measured on its raw stream, which needs no key: a node back from a
    reboot, or a slave that never loaded it, measures as well as one whose
    key is loaded (a plain 'zfs send' says "dataset key must be loaded"),
    and both nodes measure alike (a raw stream is not the size of the
    plain one)."""
    ds = cfg.local.dataset
    raw = "-w" in cfg.send_flags and zfs.key_state(ds) is not None
    return tree_changes(zfs, ds, old, new, cfg.recursive, raw)


def _tree_written(zfs: ZfsBase, ds: str) -> Set[str]:
    """The 'written' values of ds and every file system and volume below it
    (a set: {"0"} when nothing changed anywhere; empty when unreadable)."""
    proc = zfs.run(["get", "-H", "-p", "-o", "value", "-r", "-t", "filesystem,volume",
                    "written", ds], check=False)
    return set(proc.stdout.split()) if proc.returncode == 0 else set()


def _snapshot_if_changed(cfg, zfs, local: Listing, epoch: int, clock,
                         hooks: bool = False) -> Listing:
    """Take a cycle snapshot unless the dataset is unchanged since its newest
    one.  With the 'written' property that is a property read; without it
    (zfs-fuse) the snapshot is taken and, when its incremental stream from
    the previous one is empty (the two are identical, so it holds nothing
    the previous one does not), destroyed again.  With recursive = yes the
    same over the dataset and every dataset below it (snapshot -r; the
    'written' of each, or tree_changes, then destroy -r).  hooks: a
    replication cycle's snapshot, bracketed by snapshot_command and
    snapshot_done_command (_hooked_snapshot)."""
    ds, r = local.dataset, cfg.recursive
    newest = local.snaps[-1] if local.snaps else None
    # 'written' only moves when a transaction group commits (up to seconds
    # later): trust a 0 only after making the pool commit, and read it again
    if newest is not None and zfs.features().written:
        if zfs.settle(ds.split("/")[0]) and (
                _tree_written(zfs, ds) == {"0"} if r else zfs.written(ds) == "0"):
            return local
    make_name = lambda: _fresh_snapshot_name(local, epoch, clock)  # noqa: E731
    if hooks:
        name = _hooked_snapshot(cfg, zfs, ds, make_name, epoch)
    else:
        name = make_name()
        zfs.snapshot(ds, name, r)
    if newest is not None and not zfs.features().written and (
            tree_changes(zfs, ds, newest.name, name, True) == 0 if r
            else zfs.send_stream_is_empty(ds, newest.name, name)):
        zfs.run(["destroy"] + (["-r"] if r else []) + ["%s@%s" % (ds, name)])
        return local
    fresh = zfs.listing(ds)
    if fresh is None or fresh.snap(name) is None:
        raise ReplicationError("the snapshot %s@%s just taken is not listed; is the "
                               "pool healthy?" % (ds, name))
    return fresh


def _fresh_snapshot_name(local: Listing, epoch: int, clock) -> str:
    """flocker-<epoch>-<now>, not yet in local: the snapshot's name is its time."""
    name = snapshot_name(epoch, clock())
    n = 1
    while local.snap(name) is not None:
        n += 1
        name = "%s-%d" % (snapshot_name(epoch, clock()), n)
    return name


def _hooked_snapshot(cfg, zfs, ds: str, make_name, epoch: int) -> str:
    """snapshot_command, the snapshot (named by make_name() once the first
    hook is done: the name is the snapshot's time), snapshot_done_command
    (always, even when one of the others failed).  A failing or hanging
    snapshot_command means no snapshot this cycle (ReplicationError: the
    cycle is recorded as failed, with the reason).  Returns the name."""
    svc = cfg.service
    if svc.snapshot_command is None and svc.snapshot_done_command is None:
        name = make_name()
        zfs.snapshot(ds, name, cfg.recursive)
        return name
    env = {"FLOCKER_CLUSTER": cfg.name, "FLOCKER_NODE": cfg.local_name,
           "FLOCKER_DATASET": ds, "FLOCKER_EPOCH": str(epoch), "FLOCKER_ROLE": ROLE_MASTER}
    # a file system's mount point, a volume's device
    env.update(zfs.device_env(ds) or {
        "FLOCKER_MOUNTPOINT": zfs.get(ds, ["mountpoint"]).get("mountpoint", "")})
    name = ""

    def done(result: str) -> None:
        if svc.snapshot_done_command is None:
            return
        extra = {"FLOCKER_SNAPSHOT_RESULT": result}
        if name:
            extra["FLOCKER_SNAPSHOT"] = name
        r = run_command(svc.snapshot_done_command, svc.snapshot_timeout, dict(env, **extra))
        if not r.ok:
            log.warning("snapshot_done_command %s", r.describe() if r.returncode is not None
                        else "did not finish within %g s (snapshot_timeout) and was killed"
                        % svc.snapshot_timeout)
    if svc.snapshot_command is not None:
        r = run_command(svc.snapshot_command, svc.snapshot_timeout, env)
        if not r.ok:
            done("failed")
            why = (r.describe() if r.returncode is not None else
                   "'%s' did not finish within %g s (snapshot_timeout) and was killed"
                   % (" ".join(svc.snapshot_command), svc.snapshot_timeout))
            raise ReplicationError("snapshot_command %s; no snapshot was taken this cycle "
                                   "(what is pending is sent by the next one)" % why)
    try:
        name = make_name()
        zfs.snapshot(ds, name, cfg.recursive)
    except BaseException:
        done("failed")
        raise
    done("ok")
    return name


def _resume_partial(cfg, zfs: ZfsBase, peer: ZfsBase, remote: Listing, stop=None
                    ) -> Optional[TransferOutcome]:
    """OpenZFS keeps the received part of an interrupted `zfs recv -s` and
    names it by receive_resume_token: finish it with `zfs send -t` before
    anything else (it can only be the stream this master sent), sending
    only what is missing.  Returns the transfer's outcome when something
    was resumed (the caller lists the peer again), else None."""
    token = remote.props.get("receive_resume_token", "-")
    if token in ("-", "") or not (zfs.features().resumable and peer.features().resumable):
        return None
    peer.ssh.ensure_master()
    return _transfer(cfg, peer, build_resume_send_argv(token),
                     build_recv_argv(cfg.peer.dataset, True),
                     "the interrupted receive of %s (zfs send -t)" % cfg.peer.dataset,
                     stop, resuming=True)


def _transfer(cfg, peer: ZfsBase, send_argv: List[str], recv_argv: List[str], what: str,
              stop=None, progress: Optional[TransferProgress] = None,
              resuming: bool = False) -> TransferOutcome:
    """send_argv here | ssh peer recv_argv, through the peer's ssh master
    connection (which the caller made sure of), at most
    replication_bandwidth, stopped when stuck for transfer_stall_timeout.
    Returns the outcome of a transfer that succeeded.  A failed one
    resets the connection (the peer's sshd then ends the remote zfs recv
    now, instead of after it drained what is in flight), discards what a
    resumable receive into a full pool kept (_discard_unresumable), and
    raises ReplicationError saying what happened, or DivergenceError when
    the replica was written to (a fresh send only: resuming, it is the
    stream this master sent before that failed)."""
    ssh = peer.ssh
    try:
        outcome = pipe_transfer(send_argv, ssh.argv(recv_argv), cfg.transfer_stall_timeout,
                                finish_timeout=cfg.transfer_stall_timeout + ssh.command_timeout,
                                abort=ssh.reset, stop=stop, rate=cfg.replication_bandwidth,
                                progress=progress)
    finally:
        if progress is not None:
            progress.end()
    if outcome.ok:
        return outcome
    ssh.reset()
    note = _discard_unresumable(cfg, peer, outcome) if "-s" in recv_argv else ""
    text = explain_transfer(outcome, what, cfg.peer.name, cfg.peer.dataset,
                            cfg.transfer_stall_timeout, ssh.explain, note)
    if resuming:
        raise ReplicationError(text + ("" if note else "; if it keeps failing, abort it on %s "
                                       "with 'zfs recv -A %s'" % (cfg.peer.name,
                                                                  cfg.peer.dataset)))
    modified = zfs_says("modified", outcome.recv_stderr + outcome.send_stderr)
    raise (DivergenceError if modified else ReplicationError)(text)


def _discard_unresumable(cfg, peer: ZfsBase, outcome: TransferOutcome) -> str:
    """After a failed resumable transfer.  What the peer received stays for
    the next cycle to resume from, unless the receive failed because the
    peer's pool is full: resuming cannot succeed before space is freed
    there, and the partial state only holds space that freeing needs.  That
    is discarded (abort_partial_receive: never a complete snapshot), so the
    peer is as it was before the transfer.  Returns a note for the message
    ('' when nothing was discarded)."""
    if not zfs_says("no_space", outcome.send_stderr + "\n" + outcome.recv_stderr):
        return ""
    name, pds = cfg.peer.name, cfg.peer.dataset
    try:
        if not peer.abort_partial_receive(pds):
            return ""
    except FlockerError as e:
        return ("the part of the stream %s received could not be discarded (%s); it "
                "holds space there: run 'zfs recv -A %s' on %s" % (name, e.message, pds,
                                                                  name))
    return ("the part of the stream %s received was discarded there (zfs recv -A): "
            "a full pool cannot take the rest" % name)


def usable_send_flags(wanted: Sequence[str], local: ZfsFeatures,
                      peer: ZfsFeatures) -> List[str]:
    """The configured send_flags both ends support (pure)."""
    return [f for f in wanted if f in local.send_flags and f in peer.send_flags]


def _send(cfg, zfs, peer, local: Listing, target: Snap, base: Optional[str], stop=None,
          progress: Optional[TransferProgress] = None):
    lf, pf = zfs.features(), peer.features()
    flags = usable_send_flags(cfg.send_flags, lf, pf)
    for f in cfg.send_flags:
        if f not in flags:
            log.warning("send_flags %s left out: zfs on %s does not support it",
                        f, cfg.local.name if f not in lf.send_flags else cfg.peer.name)
    send_argv = build_send_argv(local.dataset, target.name, base, cfg.recursive, flags)
    recv = build_recv_argv(cfg.peer.dataset, lf.resumable and pf.resumable)
    peer.ssh.ensure_master()
    if progress is not None:
        progress.begin("%s -> %s: %s@%s" % (cfg.local.name, cfg.peer.name, local.dataset,
                                            target.name),
                       zfs.send_estimate(send_argv) if lf.send_estimate else None,
                       time.monotonic())
    what = ("%s@%s (incremental from %s)" % (local.dataset, target.name, base)
            if base else "%s@%s (full copy)" % (local.dataset, target.name))
    outcome = _transfer(cfg, peer, send_argv, recv, what, stop, progress)
    names = [s.name for s in local.snaps]
    sent = names[names.index(base) + 1:] if base in names else [target.name]
    return sent, outcome.bytes, outcome.seconds


# Snapshots a destroy found pinned by a clone, by (where, dataset): where
# zfs has no 'clones' property (zfs-fuse) the listing cannot tell, so the
# first destroy learns it and later cycles of this process skip them.  Only
# names still listed are kept (bounded by the listing); only the
# replication job's thread reads and writes it.
_PINNED_SEEN = {}   # type: Dict[Tuple[str, str], Set[str]]


def preserved_origins(store: StateStore, ds: str) -> List[str]:
    """Snapshots of ds that a preserved dataset of this node was cloned
    from: retention keeps them, silently (the clone pins them anyway)."""
    return [p["origin"].split("@", 1)[1] for p in store.preserved()
            if (p["origin"] or "").startswith(ds + "@")]


def _destroy(z: ZfsBase, ds: str, names: List[str], recursive: bool) -> List[str]:
    """Retention's destroy; returns the names it destroyed.  A snapshot a
    clone depends on (a preserved dataset, an operator's clone) is pinned:
    not destroyed, and no warning, since that is what it is for."""
    if not names:
        return []
    done = list(names)
    commands = destroy_commands(ds, names, recursive, z.features())
    for cmd, (rc, out) in zip(commands, z.run_many(commands)):
        if rc == 0:
            continue
        mine = cmd[-1].split("@", 1)[1].split(",")
        done = [n for n in done if n not in mine]
        if zfs_says("cloned", out) and len(mine) == 1:
            _PINNED_SEEN.setdefault((z.where, ds), set()).add(mine[0])
            log.debug("retention: %s@%s %s is pinned by a clone: kept", ds, mine[0],
                      z.where)
        else:
            log.warning("retention: could not destroy a snapshot of %s %s: %s",
                        ds, z.where, _stderr_text(out))
    return done


def _prune(z: ZfsBase, ds: str, listing: Listing, keep: int, protect, r) -> List[str]:
    listed = set(s.name for s in listing.snaps)
    seen = _PINNED_SEEN.get((z.where, ds), set()) & listed
    _PINNED_SEEN[(z.where, ds)] = seen
    return _destroy(z, ds, plan_prune(listing.snaps, keep, list(protect) + sorted(seen)), r)


def initial_epoch(role: str, index: int) -> int:
    """The first master takes the first epoch of its parity (see layer 6);
    a fresh slave has seen none."""
    return next_epoch(0, index) if role == ROLE_MASTER else 0


def init_node(cfg: Config, role: str, force: bool, zfs: Zfs) -> Tuple[str, List[str]]:
    """Prepare this node.  Returns (summary, list of things done).  Checks
    everything before changing anything; refuses to overwrite a node with
    history unless force, and then keeps the old state file as a backup."""
    me = cfg.local
    epoch = initial_epoch(role, cfg.local_index)
    done = []
    zfs.check_works(me.dataset)
    parent = me.dataset.rsplit("/", 1)[0]
    create_dataset = False
    if zfs.exists(me.dataset):
        done.append("dataset %s exists" % me.dataset)
    elif not zfs.exists(parent):
        raise ZfsError("the parent %s of %s %s does not exist; create it with "
                       "'zfs create -p %s'" % (parent, "the dataset" if role == ROLE_MASTER
                                               else "the replica", me.dataset, parent))
    elif role == ROLE_MASTER:
        create_dataset = True
    else:
        done.append("dataset %s will be created by the first replication" % me.dataset)

    # The boot generation of a new state file starts above anything the
    # peer may have stored for this node (it rejects older generations):
    # above the old file's, and at the current Unix time.  Daemon starts
    # then count up from there; replay protection never reads a clock.
    generation = int(wall_clock())
    exists = os.path.exists(me.state_db)
    try:
        store = StateStore.open(me.state_db, create=True, lock_for="init", deep_check=True)
    except LockBusy:
        raise
    except StateError:
        if not (exists and force):
            raise
        # a corrupt or foreign file: with --force, keep it aside untouched
        backup = set_state_file_aside(me.state_db, "bad")
        done.append("moved the unusable state file to %s" % backup)
        store = StateStore.open(me.state_db, create=True, lock_for="init")
    try:
        current = store.node_state()
        if current is not None:
            same = current.node == me.name and current.role == role
            if same and not store.has_history():
                return ("node %s is already initialised as %s (epoch %d); nothing to do"
                        % (me.name, role, current.epoch), done)
            if not force:
                raise StateError(
                    "node %s is already initialised as %s, epoch %d%s, in %s; "
                    "refusing to reinitialise it. Use --force to start over (the "
                    "old state file is kept as a backup)"
                    % (current.node, current.role, current.epoch,
                       " and has history" if store.has_history() else "", me.state_db))
            generation = max(generation, current.generation + 1)
            lock = store.lock
            backup = store.backup_and_remove()   # keeps holding the lock
            done.append("kept the old state file as %s" % backup)
            store = StateStore.open(me.state_db, create=True, lock=lock)
        if create_dataset:
            zfs.create(me.dataset)
            done.append("created dataset %s" % me.dataset)
        store.initialise(me.name, role, epoch, generation)
        done.append("state file %s records role %s, epoch %d" % (me.state_db, role, epoch))
        return ("initialised node %s as %s" % (me.name, role), done)
    finally:
        store.close()


# -- promotion and demotion ---------------------------------------------------
#
# Each is a fixed list of steps.  The intent is written to sqlite first and
# each step is recorded before it runs; every step is idempotent, so after a
# crash recover_intent() simply runs the unfinished action's steps again and
# ends in a consistent role: the service runs exactly when the role is
# master.  Start and stop commands must be idempotent (as systemctl is).
# The service address comes up before start_command and goes after
# stop_command, as keepalived and Pacemaker order them: a user system may
# bind it (PostgreSQL's listen_addresses).

PROMOTE_STEPS = ("role", "writable", "discard-partial", "mount", "address", "start", "notify")
DEMOTE_STEPS = ("stop", "address", "final-sync", "readonly", "unmount", "tidy", "role",
                "notify")
COMMAND_TRIES = 3


@record(mutable=True)
class Context:
    """What an action works with on this node; timeline: where the marks
    of its steps go (a promotion's line in the event log), if anywhere."""
    cfg: Config
    store: StateStore
    zfs: Zfs
    timeline: Optional[Timeline] = None

    def mark(self, label: str) -> None:
        if self.timeline is not None:
            self.timeline.mark(label)


def failpoint(name: str) -> None:
    """Testing aid: FLOCKER_FAILPOINT=<name> kills this process (as kill -9
    would) when it reaches that point."""
    if os.environ.get("FLOCKER_FAILPOINT") == name:
        os.kill(os.getpid(), 9)


def _service_env(ctx: Context, epoch: int, extra: Optional[Dict[str, str]] = None,
                 view: Optional[MountView] = None) -> Dict[str, str]:
    """The environment of the operator's commands; view: the dataset as a
    promotion read it (else zfs is asked whether it is a volume)."""
    ds = ctx.cfg.local.dataset
    env = {"FLOCKER_CLUSTER": ctx.cfg.name, "FLOCKER_NODE": ctx.cfg.local_name,
           "FLOCKER_DATASET": ds, "FLOCKER_EPOCH": str(epoch)}
    if view is None:
        env.update(ctx.zfs.device_env(ds))    # a volume: FLOCKER_DEVICE
    elif view.is_volume():
        env["FLOCKER_DEVICE"] = volume_device(ds)
    env.update(extra or {})
    return env


def _run_service_command(ctx: Context, what: str, argv: Optional[Tuple[str, ...]],
                         env: Dict[str, str], forked=None) -> None:
    """Run start_command or stop_command, retrying; raise when it keeps
    failing.  forked(): called once, as soon as the command's first run
    has begun (or at once without a command)."""
    if argv is None:
        if forked is not None:
            forked()
        return
    result = None
    for attempt in range(1, COMMAND_TRIES + 1):
        result = run_command(argv, ctx.cfg.service.command_timeout, env, forked=forked)
        forked = None
        if result.ok:
            log.info("%s ran in %.1f s", what, result.seconds)
            return
        log.warning("%s attempt %d of %d: %s", what, attempt, COMMAND_TRIES, result.describe())
        time.sleep(min(2.0, 0.5 * attempt))
    raise ActionError("%s failed %d times, last: %s" % (what, COMMAND_TRIES, result.describe()))


def _notify(ctx: Context, old_role: str, new_role: str, epoch: int, reason: str,
            view: Optional[MountView] = None) -> None:
    argv = ctx.cfg.service.notify_command
    if argv is None:
        return
    env = _service_env(ctx, epoch, {"FLOCKER_OLD_ROLE": old_role, "FLOCKER_NEW_ROLE": new_role,
                                    "FLOCKER_REASON": reason}, view)
    result = run_command(argv, ctx.cfg.service.command_timeout, env)
    if not result.ok:   # a notification never blocks a role change
        ctx.store.record_event("notify", "notify_command: " + result.describe(), "warning")


def fence_peer(ctx: Context, epoch: int, stop: Optional[threading.Event] = None) -> bool:
    """Run fence_command against the peer before a takeover; False when
    none is configured.  Raises ActionError when it fails."""
    argv = ctx.cfg.service.fence_command
    if argv is None:
        return False
    env = _service_env(ctx, epoch, {"FLOCKER_PEER": ctx.cfg.peer.name,
                                    "FLOCKER_PEER_ADDRESS": ctx.cfg.peer.addresses[0]})
    result = run_command(argv, ctx.cfg.service.command_timeout, env, stop=stop)
    ctx.store.record_event("fence", "fence_command %s" % (
        "succeeded" if result.ok else "FAILED: " + result.describe()),
        "info" if result.ok else "error")
    if not result.ok:
        raise ActionError("fence_command failed: %s; nothing was changed: the takeover "
                          "waits until the peer is fenced" % result.describe())
    return True


def key_problem(state: Optional[Dict[str, str]], key_command) -> str:
    """Why this node could not load its dataset's key at a promotion, as
    far as it can tell without trying ('' when it can, or cannot tell:
    key_command is only known by running it) (pure).  state: key_state()."""
    if state is None or state["keystatus"] == "available" or key_command is not None:
        return ""
    location = state["keylocation"]
    if location == "prompt":
        return ("the key of the encrypted dataset %s is not loaded and its keylocation is "
                "prompt (a raw receive sets that), so a promotion could not load it: set "
                "[service] key_command, or put the key in a file on this node and 'zfs set "
                "keylocation=file:///PATH %s'" % (state["encryptionroot"],
                                                  state["encryptionroot"]))
    if location.startswith("file://") and not os.path.exists(location[len("file://"):]):
        return ("the key of the encrypted dataset %s is not loaded and its keylocation %s "
                "does not exist on this node, so a promotion could not load it: put the key "
                "there, or set [service] key_command" % (state["encryptionroot"], location))
    return ""


def load_dataset_key(ctx: Context, then: str = "take over") -> None:
    """Before a promotion: load the key of this node's encrypted dataset
    (OpenZFS native encryption; with send_flags = -w the slave holds the
    ciphertext and never needed it), from key_command's output or else
    from the dataset's keylocation.  Loading it changes no data; when it
    cannot be loaded, ActionError says why and nothing else happens (then:
    what this node does not do until it can, for the message)."""
    ds = ctx.cfg.local.dataset
    state = ctx.zfs.key_state(ds)
    if state is None or state["keystatus"] == "available":
        return
    root, argv = state["encryptionroot"], ctx.cfg.service.key_command
    refused = "; this node does not %s until it can" % then if then else ""
    problem = key_problem(state, argv)
    if problem:
        raise ActionError(problem + refused)
    key = None
    if argv is not None:
        env = dict(os.environ, **_service_env(ctx, ctx.store.node_state().epoch))
        try:
            proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env, start_new_session=True,
                                  timeout=ctx.cfg.service.command_timeout)
        except OSError as e:
            raise ActionError("key_command cannot run (%s: %s)%s"
                              % (argv[0], e.strerror, refused)) from None
        except subprocess.TimeoutExpired:
            raise ActionError("key_command did not finish within %g s (command_timeout)%s"
                              % (ctx.cfg.service.command_timeout, refused)) from None
        if proc.returncode != 0 or not proc.stdout:
            raise ActionError("key_command %s: %s%s" % (
                "exited %d" % proc.returncode if proc.returncode else "printed no key",
                _stderr_text(proc.stderr.decode("utf-8", "replace")), refused))
        key = proc.stdout
    try:
        ctx.zfs.load_key(root, key)
    except ZfsError as e:
        raise ActionError("cannot load the key of the encrypted dataset %s (%s): %s%s"
                          % (root, "from key_command" if key is not None else
                             "from its keylocation " + state["keylocation"], e.message,
                             refused)) from None
    ctx.store.record_event("promote", "loaded the key of the encrypted dataset %s" % root)


class HandoverAborted(ActionError):
    """A planned switchover could not send the final snapshot and was
    called off; the node stays master.  resumed: it serves again (only the
    daemon's own handover, decided with the peer a live slave, resumes; a
    recovery after a crash, or 'demote' without a daemon, leaves the user
    system stopped: the peer may be master by now, and nobody would
    supervise it)."""

    def __init__(self, message: str, resumed: bool) -> None:
        super().__init__(message)
        self.resumed = resumed


def promote(ctx: Context, epoch: int, reason: str, settle=None) -> None:
    """Make this node master in `epoch` (from decide()).  With the node's
    own epoch, a master that starts up resumes serving (no notification:
    its role does not change).  settle(): called before the first write to
    the state file (the daemon writes the events that led here there)."""
    if settle is not None:
        settle()
    old = ctx.store.node_state()
    load_dataset_key(ctx)     # (when it cannot, nothing is recorded or changed)
    data = {"epoch": epoch, "reason": reason, "old_role": old.role}
    ctx.mark("intent")
    with ctx.store.relaxed():     # synced with the role, recorded next
        intent = ctx.store.begin_intent("promote", data)
    _promote_steps(ctx, intent, data, key_loaded=True)
    _record_timeline(ctx, "promote", "promotion")


def demote(ctx: Context, epoch: int, reason: str, handover: bool = False,
           stop: Optional[threading.Event] = None, quiesce=None, resume: bool = False) -> None:
    """Make this node slave; epoch is the highest epoch it knows of.
    handover: a planned switchover: after the user system stopped, the
    final snapshot goes to the peer before the dataset is given up, and
    the finished demotion records the release (announced to the peer until
    it takes over); when the final snapshot cannot be sent, HandoverAborted
    is raised and the node stays master, serving again only when `resume`.
    quiesce: called once the user system is stopped, before the dataset
    changes (the daemon ends its replication cycle there)."""
    old = ctx.store.node_state()
    data = {"epoch": max(epoch, old.epoch), "reason": reason, "old_role": old.role,
            "handover": handover}
    _demote_steps(ctx, ctx.store.begin_intent("demote", data), data, stop, quiesce, resume)
    _record_timeline(ctx, "demote", "demotion")


def _record_timeline(ctx: Context, kind: str, what: str) -> None:
    """A role action's timeline, if it kept one, in the log and as an
    event of its kind."""
    if ctx.timeline is not None:
        text = "timeline, " + ctx.timeline.text()
        log.info("%s %s", what, text)
        ctx.store.record_event(kind, text)


def stop_serving(ctx: Context, reason: str) -> None:
    """The user system stops, the role stays (a master's daemon stops):
    stop_command, then the service address, in the order of a demotion."""
    env = _service_env(ctx, ctx.store.node_state().epoch, {"FLOCKER_ROLE": ROLE_MASTER})
    _run_service_command(ctx, "stop_command", ctx.cfg.service.stop_command, env)
    if ctx.cfg.service.service_address is not None:
        remove_service_address(ctx.cfg.service.service_address)
    ctx.store.record_event("service", "user system stopped, role kept: %s" % reason)


def recover_intent(ctx: Context, stop: Optional[threading.Event] = None,
                   quiesce=None) -> Optional[str]:
    """Finish an action a crash (or a failure) interrupted.  Returns its
    name, or None.  A planned switchover's final snapshot is tried again;
    if it cannot be sent the node stays master without serving
    (HandoverAborted, never resumed from here).  quiesce: as for demote()."""
    intent = ctx.store.unfinished_intent()
    if intent is None:
        return None
    log.warning("finishing the %s interrupted at step %s", intent["action"], intent["step"])
    ctx.store.record_event("recover", "finishing the %s interrupted at step %s"
                           % (intent["action"], intent["step"]), "warning")
    iid, data = intent["id"], intent["data"]
    if intent["action"] == "promote":
        _promote_steps(ctx, iid, data)
    elif intent["action"] == "demote":
        _demote_steps(ctx, iid, data, stop, quiesce, resume=False)
    else:
        _preserve_steps(ctx, iid, data)
    return intent["action"]


def _promote_steps(ctx: Context, intent_id: int, data: dict, key_loaded: bool = False
                   ) -> None:
    """The steps of a promotion (PROMOTE_STEPS), each recorded before it
    runs.  The zfs commands run side by side where the order allows
    (issue 16: the user system follows the dataset being writable, not a
    queue of commands): readonly=off is set while receives are stopped;
    the mount, and the one listing that answers the questions of the rest
    (MountView), run beside it; the role marker is set while start_command
    runs.  What must come first still does: the role is recorded before
    the dataset changes, no receive runs once it mounts, the dataset is
    mounted read and write (a volume: its device writable) before the
    address and start_command; readonly=off, the property, ends while
    start_command runs (_mount_for_service).
    key_loaded: promote() has just loaded the dataset's key."""
    cfg, zfs, ds, epoch = ctx.cfg, ctx.zfs, ctx.cfg.local.dataset, data["epoch"]
    writable = view = env = None
    killed = []   # type: List[int]
    for step in PROMOTE_STEPS:
        ctx.mark(step)
        ctx.store.intent_step(intent_id, step)
        failpoint("promote:" + step)
        if step == "role":
            ctx.store.set_role(ROLE_MASTER, epoch, data["reason"], if_changed=True)
        elif step == "writable":
            writable = zfs.start(["set", "readonly=off", ds])
        elif step == "discard-partial":
            killed = _stop_receives(ctx, ds)
        elif step == "mount":   # a volume: its device, writable, instead
            if not key_loaded:
                load_dataset_key(ctx)     # (a recovery after a reboot: not loaded again)
            # begun before the listing is read: a volume or a mounted file
            # system only makes it fail, which is then of no account.  Read
            # and write (-o rw, for this mount): it runs beside readonly=off,
            # and OpenZFS mounted read-only when it read the property first,
            # so the file system had to be mounted again (4 commands more;
            # the OpenZFS guest, test_the_slave_takes_over_the_moment...)
            mounting = zfs.start(["mount", "-o", "rw", ds])
            view = _read_mount_view(zfs, zfs.start(MountView.args(ds, zfs.features())), ds)
            if view.resume_token() and not killed and zfs.abort_partial_receive(ds):
                ctx.store.record_event("promote", "discarded a partial receive on %s" % ds)
            env = _service_env(ctx, epoch, {"FLOCKER_ROLE": ROLE_MASTER}, view)
            if view.is_volume():
                mounting.wait(check=False)
                writable.wait()
                _volume_device_ready(ctx, ds)
            else:
                _mount_for_service(ctx, ds, writable, mounting, view)
        elif step == "address":
            sa = cfg.service.service_address
            if sa is not None:
                add_service_address(sa)
                announce_address(sa, cfg.service.announce_count, cfg.service.announce_interval)
        elif step == "start":
            _start_and_mark(ctx, env, role_marker(cfg.local_name, ROLE_MASTER, epoch),
                            writable)
        elif step == "notify":
            if data["old_role"] != ROLE_MASTER:   # a resumption is no role change
                _notify(ctx, data["old_role"], ROLE_MASTER, epoch, data["reason"], view)
    ctx.store.finish_intent(intent_id)


def _read_mount_view(zfs: Zfs, reading: ZfsRunning, ds: str,
                     missing_ok: bool = False) -> MountView:
    """The outcome of a promotion's (or a demotion's) listing
    (MountView.args); missing_ok: a dataset that does not exist is an
    empty view (view.exists() is False), else an error."""
    done = reading.wait(check=False)
    if done.returncode != 0:
        if _missing(done.stderr):
            if missing_ok:
                return MountView(ds, {})
            raise ActionError("the dataset %s does not exist on this node: there is nothing "
                              "to take over" % ds)
        reading.wait()       # raises, saying why
    return MountView.parse(done.stdout, ds, zfs.features().resumable)


def _stop_receives(ctx: Context, ds: str) -> List[int]:
    """Stop any zfs recv still running into the dataset (an old master's
    orphaned transfer must not change the data under the user system) and
    discard the partial state of a resumable one just stopped.  Returns
    the pids of those stopped."""
    killed = kill_receives(ds)
    if killed:
        ctx.store.record_event("promote", "stopped %d unfinished receive(s) into %s "
                               "(pids %s)" % (len(killed), ds, ", ".join(map(str, killed))))
        if ctx.zfs.abort_partial_receive(ds):
            ctx.store.record_event("promote", "discarded a partial receive on %s" % ds)
    return killed


def _start_and_mark(ctx: Context, env: Dict[str, str], marker: str,
                    writable: ZfsRunning) -> None:
    """start_command, and meanwhile the role marker on the dataset (for the
    peer, which reads it before it replicates; the ssh gate refuses it
    every receive from the moment the role is recorded), and the end of
    readonly=off (begun before the mount: see _mount_for_service).  A
    start that keeps failing gives the service address back: nothing
    answers on it (the step runs again when the promotion is finished
    off); so does readonly=off failing (the promotion fails, and its
    steps run again)."""
    cfg, ds = ctx.cfg, ctx.cfg.local.dataset
    marking = []
    ctx.mark("start_command begins")
    try:
        _run_service_command(ctx, "start_command", cfg.service.start_command, env,
                             forked=lambda: marking.append(
                                 ctx.zfs.start(["set", "%s=%s" % (ROLE_PROPERTY, marker), ds])))
        ctx.mark("start_command done")
        writable.wait()
    except (ActionError, ZfsError):
        if cfg.service.service_address is not None:
            remove_service_address(cfg.service.service_address)
        raise
    finally:
        for running in marking + [writable]:   # never left running
            running.wait(check=False)
    marking[0].wait()


def _volume_device_ready(ctx: Context, ds: str) -> None:
    """A promoted volume: wait until its device exists and may be written
    (the user system gets its path as FLOCKER_DEVICE)."""
    if ctx.zfs.wait_for_device(ds, writable=True) is None:
        ctx.store.record_event("promote", "volume %s has volmode=none: the user system "
                               "gets no device" % ds, "warning")


def _mount_for_service(ctx: Context, ds: str, writable: ZfsRunning, mounting: ZfsRunning,
                       view: MountView) -> None:
    """A promoted file system: mounted read and write (readonly=off and the
    mount -o rw, begun at once), then the file systems below it that mount
    automatically (the dataset itself must mount).  The user system needs
    the mount writable, which -o rw makes it, not the property: readonly=off
    is waited for here only when file systems below must mount (they
    inherit it) or the dataset must be mounted again, else after
    start_command (_start_and_mark).  Where the kernel holds the mount
    read-only anyway, it is mounted again once the property is off."""
    zfs = ctx.zfs
    below = view.to_mount_below()
    if below:
        writable.wait()
    if mounting.wait(check=False).returncode != 0 and not view.mounted(ds):
        writable.wait()
        zfs.mount(ds)      # (zfs-fuse: busy for a moment after an unmount; else it says why)
    if mount_is_read_only(ds):
        writable.wait()
        log.warning("%s was mounted read-only while readonly=off was set: mounting it again",
                    ds)
        zfs.unmount(ds)
        zfs.mount(ds)
    failed = []
    for name in below:
        try:
            zfs.mount(name)
        except ZfsError as e:
            failed.append("%s (%s)" % (name, e.message))
    if failed:
        text = "%s is mounted, but not the file system(s) below it: %s" % (ds, "; ".join(failed))
        log.warning("%s", text)
        ctx.store.record_event("promote", text, "warning")


def _demote_steps(ctx: Context, intent_id: int, data: dict,
                  stop: Optional[threading.Event] = None, quiesce=None,
                  resume: bool = False) -> None:
    cfg, zfs, ds, epoch = ctx.cfg, ctx.zfs, ctx.cfg.local.dataset, data["epoch"]
    env = _service_env(ctx, epoch, {"FLOCKER_ROLE": ROLE_SLAVE})
    # once the user system stopped and the final snapshot is out, one
    # listing of the tree (MountView) answers what the steps ask (does the
    # dataset exist, is it a volume, what is mounted): read at the first
    # step that needs it, again when a recovery begins later
    view = None   # type: Optional[MountView]

    def tree() -> MountView:
        nonlocal view
        if view is None:
            view = _read_mount_view(zfs, zfs.start(MountView.args(ds, zfs.features())), ds,
                                    missing_ok=True)
        return view
    for step in DEMOTE_STEPS:   # the reverse order of promotion
        ctx.mark(step)
        ctx.store.intent_step(intent_id, step)
        failpoint("demote:" + step)
        if step == "stop":
            _run_service_command(ctx, "stop_command", cfg.service.stop_command, env)
        elif step == "address":
            if cfg.service.service_address is not None:
                remove_service_address(cfg.service.service_address)
        elif step == "final-sync":
            if quiesce is not None:
                quiesce()
            if data.get("handover"):
                _final_sync(ctx, intent_id, data, stop, resume)
        elif step == "readonly":
            if tree().exists():
                zfs.set_prop(ds, "readonly", "on")
        elif step == "unmount":   # (a volume mounts nothing)
            if tree().exists() and not tree().is_volume():
                zfs.unmount_tree(ds, tree())
        elif step == "tidy":
            _drop_empty_leftover(ctx)
        elif step == "role":
            st = ctx.store.node_state()
            if (st.role, st.epoch) != (ROLE_SLAVE, epoch):
                ctx.store.set_role(ROLE_SLAVE, epoch, data["reason"])
            if tree().exists():
                zfs.set_prop(ds, ROLE_PROPERTY, role_marker(cfg.local_name, ROLE_SLAVE, epoch))
            if data.get("handover"):   # the final snapshot is on the peer
                ctx.store.set_released(True, "%s holds the final snapshot and may take over"
                                       % cfg.peer.name)
        elif step == "notify":
            _notify(ctx, data["old_role"], ROLE_SLAVE, epoch, data["reason"])
    ctx.store.finish_intent(intent_id)


def _drop_empty_leftover(ctx: Context) -> Optional[str]:
    """Where ZFS has no 'written' (zfs-fuse), a replication cycle takes its
    snapshot and destroys it again when its stream is empty; a crash in
    between leaves that empty snapshot behind, and the new master would
    take it for history this node has and it lacks.  Destroy it again: only
    a flocker snapshot, the newest, held by nobody (the confirmed common
    snapshot is held), whose incremental stream from the one before carries
    no change at all, so that it holds no data the one before lacks."""
    ds, zfs = ctx.cfg.local.dataset, ctx.zfs
    if ctx.cfg.recursive or zfs.features().written:
        return None
    listing = zfs.listing(ds)
    if listing is None or len(listing.snaps) < 2:
        return None
    prev, newest = listing.snaps[-2], listing.snaps[-1]
    if (not is_flocker_snapshot(newest.name) or newest.userrefs > 0
            or not zfs.send_stream_is_empty(ds, prev.name, newest.name)):
        return None
    zfs.run(["destroy", "%s@%s" % (ds, newest.name)])
    ctx.store.record_event("demote", "destroyed the empty snapshot %s@%s a crash left "
                           "behind (identical to %s)" % (ds, newest.name, prev.name))
    return newest.name


def _final_sync(ctx: Context, intent_id: int, data: dict,
                stop: Optional[threading.Event], resume: bool) -> None:
    """The user system is stopped: snapshot and send what it wrote last.
    If that fails, the switchover is called off: this node stays master,
    and serves again only when `resume` (see HandoverAborted)."""
    try:
        result = replicate_once(ctx.cfg, ctx.store, ctx.zfs, peer_zfs(ctx.cfg), stop=stop)
    except FlockerError as e:
        ctx.store.finish_intent(intent_id)
        peer = ctx.cfg.peer.name
        if resume:
            why = ("the switchover to %s was called off: the final snapshot could not be "
                   "sent (%s); serving again as master" % (peer, e.message))
            ctx.store.record_event("handover", why, "error")
            promote(ctx, data["epoch"], "resumed after a failed switchover")
            raise HandoverAborted(why, resumed=True) from None
        why = ("the switchover to %s was called off: the final snapshot could not be sent "
               "(%s); this node stays master with its user system STOPPED (%s may be "
               "master by now, and nothing would supervise it): the daemon resumes "
               "serving once it sees %s is not master; or fix the cause and run 'demote' "
               "again" % (peer, e.message, peer, peer))
        ctx.store.record_event("handover", why, "error")
        raise HandoverAborted(why, resumed=False) from None
    ctx.store.record_event("handover", "final snapshot %s is on %s: handing over"
                           % (result.snapshot, ctx.cfg.peer.name))


# -- keeping divergent data ---------------------------------------------------
#
# The loser of a divergence keeps what it wrote after the newest common
# snapshot, without copying data and without destroying anything:
#   snapshot DS (catches unsnapshotted writes) -> rename DS to PRESERVED ->
#   clone PRESERVED@common back to DS -> promote DS
# DS then holds the snapshots up to @common (same GUIDs) and the contents
# of @common, ready for an incremental receive from the winner; PRESERVED is
# a read-only clone of DS@common holding every divergent snapshot.
# DS keeps what is its own: every property set on it (mountpoint, atime,
# compression, quota, user properties...; read before anything changes and
# given to the clone) and its child datasets (the user's, not replicated
# with recursive = no: moved back under DS after the clone, untouched).
# PRESERVED is set aside: canmount=noauto, and a mountpoint of its own
# (the service's with its -diverged-... suffix) when DS had one set, so it
# never takes the service's path, at boot or when mounted by hand.

# Properties a dataset gets only when it is made: its clone has its origin's
# (an encrypted one's too: zfs promote then moves the encryption root, with
# its keylocation, to the clone).
CREATION_ONLY = ("volblocksize", "encryption", "keyformat", "keylocation", "pbkdf2iters")

PRESERVE_STEPS = ("snapshot", "unmount", "rename", "aside", "clone", "properties", "promote",
                  "children", "protect", "record")


def preserved_name(dataset: str, epoch: int, now: float) -> str:
    return "%s-diverged-%d-%s" % (dataset, epoch,
                                  time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)))


def preserved_names(dataset: str, names: Sequence[str]) -> List[Tuple[str, int]]:
    """(name, epoch) of each of `names` that preserved_name() made for
    dataset (pure): what a state file restored from an older backup may no
    longer list (Daemon._relearn_preserved)."""
    pattern = re.compile(r"^%s-diverged-(\d+)-\d{8}T\d{6}Z$" % re.escape(dataset))
    out = []
    for name in names:
        m = pattern.match(name)
        if m:
            out.append((name, int(m.group(1))))
    return out


def preserve_divergence(ctx: Context, common: str, epoch: int, reason: str,
                        then_demote: bool = False) -> str:
    """Keep this node's data written after snapshot `common` (a snapshot
    name without the dataset) as a separate dataset; returns its name.
    The service must be stopped (the dataset is unmounted).  then_demote:
    the demotion to slave (in `epoch`) follows as part of the same recorded
    action, so that a crash in between never leaves a master that resumes
    serving the rolled-back dataset."""
    ds = ctx.cfg.local.dataset
    if ctx.cfg.recursive:
        # (the verdict refuses it before the loser stops: see resolved();
        # here only when it wrote more between its measure and its stop)
        raise recursive_refusal(ctx.cfg, common)
    if not ctx.zfs.exists("%s@%s" % (ds, common)):
        raise ActionError("the common snapshot %s@%s does not exist; nothing was changed"
                          % (ds, common))
    now = wall_clock()
    key = ctx.zfs.key_state(ds)
    data = {"dataset": ds, "common": common, "epoch": epoch, "reason": reason,
            "then_demote": then_demote, "preserved": preserved_name(ds, epoch, now),
            "snapshot": "preserve-%d-%s" % (epoch, time.strftime("%Y%m%dT%H%M%SZ",
                                                                   time.gmtime(now))),
            # what is the live dataset's own, read before anything changes
            # (a clone takes what is fixed at creation from its origin)
            "props": {p: v for p, v in ctx.zfs.local_props(ds).items()
                      if p not in CREATION_ONLY},
            "encrypted": key is not None,
            # (zfs promote unloads it: loaded again only when it was loaded)
            "key_loaded": key is not None and key["keystatus"] == "available",
            "children": [c[len(ds) + 1:] for c in ctx.zfs.descendants(ds)
                         if "/" not in c[len(ds) + 1:]]}
    _preserve_steps(ctx, ctx.store.begin_intent("preserve", data), data)
    return data["preserved"]


def _preserve_steps(ctx: Context, intent_id: int, data: dict) -> None:
    zfs, ds, kept, common = ctx.zfs, data["dataset"], data["preserved"], data["common"]
    props = data.get("props", {})      # (an intent of an older version has neither)
    children = data.get("children", [])
    # An encrypted clone changes when it is first mounted (OpenZFS 2.3.2:
    # 'written' 85K), and then takes no increment from the winner ("has been
    # modified"): it is made canmount=noauto, and gets its own canmount back
    # only once it is read-only and unmounted.
    unmounted = {"canmount": "noauto"} if data.get("encrypted") else {}
    for step in PRESERVE_STEPS:
        ctx.store.intent_step(intent_id, step)
        failpoint("preserve:" + step)
        renamed = zfs.exists(kept)
        if step == "snapshot":
            if not renamed and not zfs.exists("%s@%s" % (ds, data["snapshot"])):
                zfs.snapshot(ds, data["snapshot"], recursive=False)
        elif step == "unmount":
            if not renamed:
                zfs.unmount_tree(ds)
        elif step == "rename":
            if not renamed:
                zfs.rename(ds, kept)
        elif step == "aside":
            _set_aside(zfs, ds, kept, props)
        elif step == "clone":
            if not zfs.exists(ds):
                zfs.clone("%s@%s" % (kept, common), ds, dict(props, **unmounted))
        elif step == "properties":
            _restore_props(ctx, ds, {p: v for p, v in props.items() if p not in unmounted})
        elif step == "promote":
            if zfs.origin(ds) == "%s@%s" % (kept, common):
                zfs.promote_clone(ds)
            # encrypted: zfs promote made ds the encryption root (of kept
            # too) and unloaded its key
            if data.get("key_loaded", True):
                _reload_key(ctx, ds, kept)
        elif step == "children":    # the user's own: back under the live dataset
            for child in children:
                if zfs.exists("%s/%s" % (kept, child)) and not zfs.exists(
                        "%s/%s" % (ds, child)):
                    zfs.rename("%s/%s" % (kept, child), "%s/%s" % (ds, child))
        elif step == "protect":   # both read-only; the replica also unmounted
            zfs.set_prop(kept, "readonly", "on")
            zfs.set_prop(ds, "readonly", "on")
            if not zfs.is_volume(ds):
                zfs.unmount_tree(ds)
            if unmounted:
                zfs.set_prop(ds, "canmount", props.get("canmount", "on"))
        elif step == "record":
            ctx.store.add_preserved(kept, data["epoch"], "%s@%s" % (ds, common), data["reason"])
    if not data.get("then_demote"):
        ctx.store.finish_intent(intent_id)
        return
    old = ctx.store.node_state()
    demotion = {"epoch": max(data["epoch"], old.epoch), "reason": data["reason"],
                "old_role": old.role, "handover": False}
    _demote_steps(ctx, ctx.store.finish_intent(intent_id, then=("demote", demotion)),
                  demotion)


def _reload_key(ctx: Context, ds: str, kept: str) -> None:
    """Load again the key zfs promote unloaded (it was loaded when the
    preservation began).  Nothing that follows needs it: the loser becomes
    a slave, which takes raw increments without a key, and loads it at its
    next takeover.  So a key that cannot be loaded now is said (log and
    event), not fatal: the data is kept either way."""
    try:
        load_dataset_key(ctx, "")
    except ActionError as e:
        text = ("the key of %s (and of the kept %s), unloaded by zfs promote, could not be "
                "loaded again: %s. Nothing is lost: this node goes on as slave (raw "
                "increments need no key); load it ('zfs load-key %s') to read the kept data"
                % (ds, kept, e.message, ds))
        log.warning("%s", text)
        ctx.store.record_event("preserve", text, "warning")


def _set_aside(zfs: ZfsBase, ds: str, kept: str, props: Dict[str, str]) -> None:
    """The preserved copy never mounts by itself, and never at the live
    dataset's mountpoint: when that was set on the dataset (and so moved
    with the rename), the copy gets the same path with its own suffix.  A
    preserved volume gets no device (volmode=none): a second disk with the
    same file system and LVM identities as the live one would let the host
    (udev, LVM, mount by UUID) take the stale copy for it."""
    if zfs.is_volume(kept):
        zfs.set_prop(kept, "volmode", "none")
        return
    zfs.set_prop(kept, "canmount", "noauto")
    mp = props.get("mountpoint", "")
    if mp.startswith("/") and zfs.get(kept, ["mountpoint"]).get("mountpoint") == mp:
        zfs.set_prop(kept, "mountpoint", (mp.rstrip("/") or "/" + ds.rsplit("/", 1)[-1])
                     + kept[len(ds):])


def _restore_props(ctx: Context, ds: str, props: Dict[str, str]) -> None:
    """Give the live dataset (the clone) every property it had set on
    itself, where the clone did not get it at creation.  One zfs refuses
    is said (log and event), not fatal: the data is in place either way."""
    have = ctx.zfs.local_props(ds)
    for prop, value in sorted(props.items()):
        if have.get(prop) == value:
            continue
        try:
            ctx.zfs.set_prop(ds, prop, value)
        except ZfsError as e:
            text = ("could not give %s its own property %s=%s again after keeping its "
                    "divergent data (%s): set it by hand ('zfs set %s=%s %s')"
                    % (ds, prop, value, e.message, prop, value, ds))
            log.warning("%s", text)
            ctx.store.record_event("preserve", text, "warning")


def discard_preserved(ctx: Context, name: str) -> None:
    """Destroy a preserved dataset: only one this node recorded, only when
    it is still the clone it was made as (an operator's request)."""
    recorded = {p["dataset"]: p for p in ctx.store.preserved()}
    if name not in recorded:
        raise FlockerError(
            "%s is not a preserved dataset of this node (status lists them: %s); refusing "
            "to destroy it" % (name, ", ".join(sorted(recorded)) or "there are none"))
    if ctx.zfs.exists(name):
        origin = ctx.zfs.origin(name)
        if not origin:
            raise FlockerError(
                "%s is no longer a clone (was 'zfs promote' run on it?), so it may hold the "
                "only copy of older snapshots; refusing to destroy it: check it and use "
                "'zfs destroy' yourself" % name)
        below = ctx.zfs.descendants(name)
        if below:
            raise FlockerError(
                "%s has %d dataset(s) below it that flocker-failover did not preserve (%s): "
                "they may hold data that exists nowhere else (an older version moved the "
                "user's child datasets there); refusing to destroy anything. Move them "
                "out ('zfs rename %s NEWNAME') or destroy them yourself, then discard "
                "again" % (name, len(below), ", ".join(below[:5]), below[0]))
        copies = ctx.zfs.clones_of(name)
        if copies:
            raise FlockerError(
                "%s has %d clone(s) that depend on it (%s; copy-preserved makes one "
                "named %s-copy); refusing to destroy anything: destroy them first "
                "('zfs destroy %s'), then discard again"
                % (name, len(copies), ", ".join(copies), name, copies[0]))
        # -r: its own snapshots; never -R, which would reach other datasets' clones
        ctx.zfs.run(["destroy", "-r", name], retry_busy=True)
    ctx.store.remove_preserved(name)


def copy_preserved(ctx: Context, name: str, mountpoint: Optional[str]
                   ) -> Tuple[str, str, str]:
    """A writable copy of a preserved dataset (a clone of its newest
    snapshot, which holds every byte written after the split), mounted at
    mountpoint (a volume: its device, and no mountpoint), to run a second
    instance of a database (a virtual machine) on and look at what the
    loser wrote.  The preserved dataset does not change, nor the state file
    (this runs beside a running daemon).  Returns (the copy's name, the
    snapshot it was made from, where it is: the mount point or device)."""
    recorded = {p["dataset"] for p in ctx.store.preserved()}
    if name not in recorded or not ctx.zfs.exists(name):
        raise FlockerError(
            "%s is not a preserved dataset of this node (status lists them: %s)"
            % (name, ", ".join(sorted(recorded)) or "there are none"))
    volume = ctx.zfs.is_volume(name)
    if volume and mountpoint is not None:
        raise FlockerError("%s is a volume, which mounts nothing: leave out --mountpoint "
                           "(the copy is a device, %s)" % (name, volume_device(name + "-copy")))
    if not volume and mountpoint is None:
        raise FlockerError("%s is a file system: say where its copy is mounted, with "
                           "--mountpoint DIR (an absolute path)" % name)
    if not volume and not mountpoint.startswith("/"):
        raise FlockerError("--mountpoint: expected an absolute path, found %r" % mountpoint)
    copy = name + "-copy"
    if ctx.zfs.exists(copy):
        raise FlockerError("%s already exists (an earlier copy); look there, or destroy it "
                           "('zfs destroy %s') and copy again" % (copy, copy))
    listing = ctx.zfs.listing(name)
    if listing is None or not listing.snaps:
        raise FlockerError("%s has no snapshot to copy from; nothing was changed" % name)
    snap = listing.snaps[-1].name
    if volume:    # (its volmode is inherited, not the preserved one's none)
        ctx.zfs.clone("%s@%s" % (name, snap), copy, {"readonly": "off"})
        return copy, snap, ctx.zfs.wait_for_device(copy, writable=True) or (
            "no device: volmode=none is inherited there; 'zfs set volmode=full %s'" % copy)
    ctx.zfs.clone("%s@%s" % (name, snap), copy,
                  {"mountpoint": mountpoint, "readonly": "off", "canmount": "on"})
    ctx.zfs.mount(copy)
    return copy, snap, mountpoint


# -- resolving a divergence ---------------------------------------------------
#
# Both nodes run resolve_divergence() at the same time (the heartbeat flag
# "resolving" makes the second join in).  Each measures its own side, with
# everything written so far snapshotted first, and publishes it on its own
# dataset as the user property flocker:divergence:
#     v3 <common GUID> <attempt> <epoch> <changes in bytes> <serving> <policy> <winner or ->
# then reads the peer's over ssh and computes verdict() from the two: both
# get the same answer from the same facts.  <attempt> is the newest epoch of
# the pair when the attempt began (the higher of this node's epoch and the
# one in the peer's role marker): both sides compute the same, a crash and
# restart keeps it, and a later divergence on the same common snapshot
# (nothing written in between) has a newer one, since a promotion came
# between the two: facts of an older attempt are never read as this one's.
# A winner promoted above both publishes its facts again under its new
# epoch, for a loser that restarts and so begins from that epoch.  The
# changes of a side are the size of its incremental stream from the newest common snapshot to its
# newest snapshot (0 when that stream carries no change): a measure both
# zfs-fuse and OpenZFS give alike.  The loser stops its user system, keeps
# its divergent data (preserve_divergence, or nothing when it has none),
# and becomes slave; the winner serves (promoted above both epochs when it
# was not the serving master) and announces the service address again.
# No replication runs meanwhile, and nothing is rolled back.

RESOLVE_WAIT = 120.0     # seconds to wait for the peer's published facts
CHOICE_SETTLE = 3.0      # seconds an unresolved verdict waits for a choice on its way
UNRESOLVED_RETRY = 60.0  # seconds between two looks at an unresolved divergence


class NeedsOperator(ActionError):
    """The verdict leaves the divergence to a person (manual policy, a
    policy mismatch, both changed under zero-changes-only)."""


RECURSIVE_SUFFIX = "+recursive"   # on the policy word: this node has recursive = yes


def format_divergence(common_guid: str, attempt: int, epoch: int, changes: int, policy: str,
                      winner: Optional[str], serving: bool = False,
                      recursive: bool = False) -> str:
    return "v3 %s %d %d %d %d %s %s" % (common_guid, attempt, epoch, changes, int(serving),
                                        policy + (RECURSIVE_SUFFIX if recursive else ""),
                                        winner or "-")


def parse_divergence(value: Optional[str]) -> Optional[dict]:
    """A node's published facts, or None (none, or another version's: a
    node of an older version never resolves with this one)."""
    words = (value or "").split()
    if (len(words) != 8 or words[0] != "v3" or not all(w.isdigit() for w in words[2:5])
            or words[5] not in ("0", "1")):
        return None
    policy, recursive = words[6], words[6].endswith(RECURSIVE_SUFFIX)
    if recursive:
        policy = policy[:-len(RECURSIVE_SUFFIX)]
    return {"common_guid": words[1], "attempt": int(words[2]), "epoch": int(words[3]),
            "changes": int(words[4]), "serving": words[5] == "1", "policy": policy,
            "recursive": recursive, "winner": None if words[7] == "-" else words[7]}


def facts_of_this_attempt(theirs: Optional[dict], common_guid: str, attempt: int) -> bool:
    """The peer's published facts belong to this attempt: the same common
    snapshot, and an attempt at least as new (older ones are left from an
    earlier resolution on the same snapshot; a newer one is a winner's
    republished facts)."""
    return (theirs is not None and theirs["common_guid"] == common_guid and
            theirs["attempt"] >= attempt)


def divergence_verdict(me: Side, peer: Side, my_choice: Optional[str],
                       peer_choice: Optional[str]) -> Verdict:
    """verdict(), unless an operator chose a winner on either node (pure,
    and symmetric like verdict())."""
    choices = {c for c in (my_choice, peer_choice) if c}
    if len(choices) > 1:
        return Verdict(VERDICT_OPERATOR, None, None, False,
                       "the operators chose different winners (%s): choose one"
                       % ", ".join(sorted(choices)))
    if choices:
        w = choices.pop()
        winner, loser = (me, peer) if me.node == w else (peer, me)
        return resolved(winner, loser, "an operator chose it ('resolve --winner %s')" % w)
    return verdict(me, peer)


def my_divergence_side(ctx: Context, peer_listing: Listing, snapshot: bool = True
                       ) -> Tuple[Side, Snap, int]:
    """Snapshot what this node wrote (when anything changed; not for a dry
    run) and measure its changes since the newest common snapshot:
    (side, common, epoch)."""
    cfg, zfs, ds = ctx.cfg, ctx.zfs, ctx.cfg.local.dataset
    st = ctx.store.node_state()
    local = zfs.listing(ds)
    if local is None:
        raise ActionError("the dataset %s does not exist here; nothing to resolve" % ds)
    common = find_common(local, peer_listing)
    if common is None:
        raise NeedsOperator("%s and %s on %s share no snapshot: no automatic resolution; "
                            "compare them and keep one by hand" % (ds, peer_listing.dataset,
                                                                   cfg.peer.name))
    if snapshot:
        local = _snapshot_if_changed(cfg, zfs, local, st.epoch, wall_clock)
    after = snaps_after(local, common.guid)
    changes = changes_since(cfg, zfs, common.name, after[-1].name) if after else 0
    # the epoch this side wrote its divergent data under: the one in the
    # name of its first snapshot after the common one, which a later
    # promotion does not change.  A side that changed nothing offers its
    # current epoch if it is master, else 0: with no change on either side
    # the master of the newer epoch simply continues.
    if changes:
        epoch = next((e for e in map(snapshot_epoch, (x.name for x in after))
                      if e is not None), st.epoch)
    else:
        epoch = st.epoch if st.role == ROLE_MASTER else 0
    return (Side(cfg.local_name, epoch, cfg.divergence_policy, changes,
                 recursive=cfg.recursive), common, st.epoch)


def resolve_divergence(ctx: Context, peer: ZfsBase, stop: threading.Event,
                       winner_choice: Optional[str] = None, dry_run: bool = False,
                       quiesce=None, peer_stopped=None, pause=None,
                       serving: bool = False, yield_first: bool = False
                       ) -> Tuple[Verdict, str]:
    """Reach the verdict with the peer and carry out this node's part;
    returns it and the GUID of the common snapshot.  pause: called first,
    ends the replication cycle in flight (none runs while resolving);
    quiesce: called by a loser once its user system is stopped; serving:
    this node ran the user system as master when the attempt began (kept
    from its facts already published for this attempt, across a restart).
    yield_first: this serving master met a serving master of a newer epoch
    (split_brain_yields()): its user system stops before anything else,
    so that two hosts write for no longer than it takes to hear each
    other, not for the verdict's round trips; the verdict still counts it
    as serving, and if it wins, it serves again (_win).

    The steps: publish this node's side (_publish_my_side), wait for the
    peer's (_their_side), judge, giving an operator's choice a moment to
    arrive (_settled_verdict), record the verdict (_record_verdict), then
    lose or win (_carry_out_verdict)."""
    cfg = ctx.cfg
    stopped = False
    if yield_first and not dry_run:
        _stop_user_system(ctx, ctx.store.node_state().epoch, quiesce)
        ctx.store.record_event("verdict", "stopped the user system at once: %s serves as "
                               "master of a newer epoch; the verdict decides whose data "
                               "continues" % cfg.peer.name, "warning")
        stopped = True
    if pause is not None and not dry_run:
        pause()
    remote = peer.listing(cfg.peer.dataset)
    if remote is None:
        raise ActionError("%s does not exist on %s; nothing to resolve"
                          % (cfg.peer.dataset, cfg.peer.name))
    me, common, attempt, facts = _publish_my_side(ctx, remote, winner_choice, serving,
                                                  dry_run)
    theirs, remote = _their_side(ctx, peer, remote, common, attempt, dry_run, stop)
    if theirs is None:
        # the newest common snapshot moved meanwhile (a transfer that was
        # on its way): measure again against the new one
        return resolve_divergence(ctx, peer, stop, winner_choice, dry_run, quiesce,
                                  peer_stopped, pause, serving=me.serving)
    v, other = _settled_verdict(ctx, peer, remote, me, common, attempt, theirs,
                                winner_choice, dry_run)
    if dry_run:
        return v, common.guid
    _record_verdict(ctx, me, other, common, v)
    failpoint("resolve:verdict")
    top = max(attempt, me.epoch, other.epoch, _marker_epoch(remote))  # epochs now
    _carry_out_verdict(ctx, v, me, other, common, attempt, top, facts, winner_choice,
                       quiesce, peer_stopped, stopped)
    return v, common.guid


def _publish_my_side(ctx: Context, remote: Listing, winner_choice: Optional[str],
                     serving: bool, dry_run: bool) -> Tuple[Side, Snap, int, str]:
    """This node's side of the divergence, measured against the newest
    common snapshot, and published in its dataset's DIVERGENCE_PROPERTY
    (not in a dry run).  The attempt is numbered by the newest epoch
    either side carries; a node that published for this attempt before
    (a restart) keeps what it said of serving, also when the common
    snapshot it finds now is another.  Returns (its side, the
    common snapshot, the attempt, the facts as published)."""
    zfs, ds = ctx.zfs, ctx.cfg.local.dataset
    me, common, epoch = my_divergence_side(ctx, remote, snapshot=not dry_run)
    attempt = max(epoch, _marker_epoch(remote))
    mine = parse_divergence(zfs.get(ds, [DIVERGENCE_PROPERTY]).get(DIVERGENCE_PROPERTY))
    if mine is not None and mine["attempt"] >= attempt:
        # what it was when this attempt began, whatever the common snapshot
        # read now (a restart while the peer keeps its data aside may read
        # its replica half-way and find an older one: it did, and the
        # restarted winner, no longer serving, judged itself not serving
        # and lost to the loser, which it had beaten)
        serving = serving or mine["serving"]
    if not facts_of_this_attempt(mine, common.guid, attempt) and mine is not None \
            and not dry_run:
        log.info("this node's facts published before (attempt %d, common snapshot GUID %s, "
                 "%s) are not of this attempt (%d, %s %s): measuring anew", mine["attempt"],
                 mine["common_guid"], "serving" if mine["serving"] else "not serving",
                 attempt, common.name, common.guid)
    me = replace(me, serving=serving)
    facts = format_divergence(common.guid, attempt, me.epoch, me.changes, me.policy,
                              winner_choice, me.serving, me.recursive)
    if not dry_run:
        zfs.set_prop(ds, DIVERGENCE_PROPERTY, facts)
        failpoint("resolve:published")
    return me, common, attempt, facts


def _their_side(ctx: Context, peer: ZfsBase, remote: Listing, common: Snap, attempt: int,
                dry_run: bool, stop: threading.Event) -> Tuple[Optional[dict], Listing]:
    """Wait up to RESOLVE_WAIT for the peer's facts of this attempt (a dry
    run does not wait: it assumes what the peer's listing shows).  Returns
    them and the peer's newest listing; None for the facts when the newest
    common snapshot has moved meanwhile (the peer published for another
    one, which this node holds too)."""
    cfg, zfs, ds = ctx.cfg, ctx.zfs, ctx.cfg.local.dataset
    deadline = time.monotonic() + RESOLVE_WAIT
    while True:
        theirs = parse_divergence(remote.props.get(DIVERGENCE_PROPERTY))
        if facts_of_this_attempt(theirs, common.guid, attempt):
            return theirs, remote
        if theirs is not None and theirs["common_guid"] == common.guid:
            theirs = None    # an earlier attempt's: wait for this one's
        # the peer published for another common snapshot: has ours moved?
        moved = (find_common(zfs.listing(ds) or Listing(ds, {}, ()), remote)
                 if theirs is not None and not dry_run else None)
        if moved is not None and moved.guid != common.guid:
            return None, remote
        if dry_run:
            after = snaps_after(remote, common.guid)
            return {"epoch": _marker_epoch(remote),
                    "changes": -1 if after else 0, "serving": False,
                    "policy": cfg.divergence_policy, "recursive": cfg.recursive,
                    "winner": None}, remote
        if time.monotonic() > deadline or stop.is_set():
            raise ActionError("%s did not publish its side of the divergence within %g s; "
                              "is its daemon running?" % (cfg.peer.name, RESOLVE_WAIT))
        time.sleep(0.3)
        remote = peer.listing(cfg.peer.dataset) or remote


def _settled_verdict(ctx: Context, peer: ZfsBase, remote: Listing, me: Side, common: Snap,
                     attempt: int, theirs: dict, winner_choice: Optional[str],
                     dry_run: bool) -> Tuple[Verdict, Side]:
    """The verdict on both sides' facts.  When it leaves the choice to an
    operator, look again for up to CHOICE_SETTLE: an operator's choice may
    be on its way in the peer's facts (it began the attempt this node
    joined).  Returns the verdict and the peer's side."""
    cfg = ctx.cfg
    other = Side(cfg.peer.name, theirs["epoch"], theirs["policy"], theirs["changes"],
                 theirs["serving"], theirs["recursive"])
    v = divergence_verdict(me, other, winner_choice, theirs["winner"])
    settle = time.monotonic() + CHOICE_SETTLE
    while v.status != VERDICT_RESOLVED and not dry_run and time.monotonic() < settle:
        time.sleep(0.3)
        fresh = parse_divergence((peer.listing(cfg.peer.dataset) or remote).props.get(
            DIVERGENCE_PROPERTY))
        if facts_of_this_attempt(fresh, common.guid, attempt) and fresh != theirs:
            theirs = fresh
            other = Side(cfg.peer.name, theirs["epoch"], theirs["policy"],
                         theirs["changes"], theirs["serving"], theirs["recursive"])
            v = divergence_verdict(me, other, winner_choice, theirs["winner"])
    return v, other


def _record_verdict(ctx: Context, me: Side, other: Side, common: Snap, v: Verdict) -> None:
    """Log and record the verdict with both sides' facts; a verdict that
    leaves it to an operator raises NeedsOperator, saying how to keep a
    side by hand."""
    cfg, ds = ctx.cfg, ctx.cfg.local.dataset
    split = is_split_brain(me, other)
    text = ("%s since %s@%s: %s: %d bytes changed, epoch %d%s; %s: %d bytes changed, "
            "epoch %d%s. Verdict: %s" % (
                "split brain" if split else "the nodes rejoin", ds, common.name,
                me.node, me.changes, me.epoch, ", serving" if me.serving else "",
                other.node, other.changes, other.epoch, ", serving" if other.serving else "",
                v.reason))
    log.log(logging.WARNING if split else logging.INFO, "%s", text)
    ctx.store.record_event("verdict", text, "error" if v.status != VERDICT_RESOLVED else
                           "warning" if split else "info")
    if v.status != VERDICT_RESOLVED:
        raise NeedsOperator(v.reason + keep_by_hand_hint(cfg, v))


def _carry_out_verdict(ctx: Context, v: Verdict, me: Side, other: Side, common: Snap,
                       attempt: int, top: int, facts: str, winner_choice: Optional[str],
                       quiesce, peer_stopped, stopped: bool) -> None:
    """This node's part of the verdict: the loser keeps its divergent data
    and becomes the slave (_lose), the winner serves (_win); a winner that
    promoted above both republishes the same facts under its new epoch,
    for a loser that restarts and begins again from there.  A loser the
    winner's changes have not reached is OUTDATED first (_outdated_by)."""
    cfg = ctx.cfg
    if v.loser == cfg.local_name:
        _outdated_by(ctx, other, common)
        _lose(ctx, common, top, v, quiesce, facts, stopped)
        return
    _win(ctx, top, v, peer_stopped)
    won = ctx.store.node_state().epoch
    if won > attempt:
        ctx.zfs.set_prop(cfg.local.dataset, DIVERGENCE_PROPERTY, format_divergence(
            common.guid, won, me.epoch, me.changes, me.policy, winner_choice,
            me.serving, me.recursive))


def recursive_refusal(cfg: Config, common: str, stopped: bool = False) -> NeedsOperator:
    """This node changed its dataset or a child since snapshot `common`,
    with recursive = yes: the tool does not keep that data (preserve_divergence,
    rejoin); stopped: its user system was stopped all the same (rejoin)."""
    ds = cfg.local.dataset
    return NeedsOperator(
        "this node changed %s or its child datasets since %s@%s, and flocker-failover "
        "does not keep the divergent data of datasets with recursive = yes: no data was "
        "changed%s%s" % (ds, ds, common,
                         ", and this node's user system was stopped (%s is master); its "
                         "role is unchanged" % cfg.peer.name if stopped else "",
                         keep_by_hand_hint(cfg, Verdict(VERDICT_OPERATOR, None, None, False, "",
                                                        kept_by_hand=cfg.local_name))))


def keep_by_hand_hint(cfg: Config, v: Verdict) -> str:
    """How the operator keeps the data of a side the tool does not keep
    (recursive = yes), with that node's names ('' for other verdicts)."""
    if v.kept_by_hand is None:
        return ""
    node = cfg.local if v.kept_by_hand == cfg.local_name else cfg.peer
    ds = node.dataset
    return (". To keep %s's data and let it resync: on %s, stop flocker-failover's "
            "daemon (a serving master stops its user system), then run 'zfs rename %s "
            "%s-kept' (its child datasets move with it), 'zfs set canmount=noauto "
            "%s-kept', 'flocker_failover.py init --role slave --force', and start the "
            "daemon again: the other node continues and sends it a full copy. Or, to "
            "let %s continue instead, do the same on the other node"
            % (node.name, node.name, ds, ds, ds, node.name))


def _marker_epoch(listing: Listing) -> int:
    """The epoch in a dataset's flocker:role marker (0 without one)."""
    marker = parse_role_marker(listing.props.get(ROLE_PROPERTY))
    return marker[2] if marker else 0


def split_brain_yields(own_epoch: int, peer_epoch: Optional[int], serving: bool,
                       peer_serving: bool) -> bool:
    """Two serving masters hear each other: the one of the older epoch
    stops its user system at once, before the verdict (which may take
    seconds of ssh round trips), as it would on a one-way link
    (DECIDE_STEP_DOWN).  Epochs of two nodes never tie (next_epoch), so
    exactly one of them yields; the verdict then decides whose data
    continues."""
    return serving and peer_serving and peer_epoch is not None and peer_epoch > own_epoch


def _stop_user_system(ctx: Context, epoch: int, quiesce) -> None:
    """Stop the user system, let the service address go, then quiesce."""
    cfg = ctx.cfg
    env = _service_env(ctx, epoch, {"FLOCKER_ROLE": ROLE_SLAVE})
    _run_service_command(ctx, "stop_command", cfg.service.stop_command, env)
    if cfg.service.service_address is not None:
        remove_service_address(cfg.service.service_address)
    if quiesce is not None:
        quiesce()


def _outdated_by(ctx: Context, winner: Side, common: Snap) -> None:
    """The winner wrote since the common snapshot: this node, its slave
    from now on, lacks that data until it holds the winner's newest
    snapshot (RoleKeeper.observe_peer clears the mark then).  Marked before
    this node stops or keeps anything, in the state file: should the
    winner die before it sends its changes (before it serves, even), the
    loser must not take over with the common snapshot's data, the wrong
    data, while the only copy of the winner's writes waits on a dead host."""
    if winner.changes > 0 and not ctx.store.node_state().outdated:
        ctx.store.set_outdated(True, "%s won the divergence verdict with %d bytes written "
                               "since %s that this node lacks; no automatic takeover until "
                               "it holds %s's newest snapshot ('promote --force' if %s is "
                               "lost for good)" % (winner.node, winner.changes, common.name,
                                                   winner.node, winner.node), common.guid)


def _lose(ctx: Context, common: Snap, top: int, v: Verdict, quiesce, facts: str,
          stopped: bool = False) -> None:
    cfg, zfs, ds = ctx.cfg, ctx.zfs, ctx.cfg.local.dataset
    if not stopped:
        _stop_user_system(ctx, top, quiesce)
    # measured again now that nothing writes any more
    local = _snapshot_if_changed(cfg, zfs, zfs.listing(ds), top, wall_clock)
    after = snaps_after(local, common.guid)
    if after and changes_since(cfg, zfs, common.name, after[-1].name) > 0:
        # (the demotion is part of the preservation: see then_demote)
        kept = preserve_divergence(ctx, common.name, top, v.reason, then_demote=True)
        log.warning("kept this node's divergent data as %s", kept)
        # the dataset under the old name is new: publish the facts there
        # again, for a peer that has not read them yet
        zfs.set_prop(ds, DIVERGENCE_PROPERTY, facts)
    else:
        _drop_empty_divergence(ctx, common)
        demote(ctx, top, v.reason)


def _drop_empty_divergence(ctx: Context, common: Snap) -> List[str]:
    """The loser changed nothing since the common snapshot: the snapshots
    it took after it carry no change (the stream from common to the newest
    is empty: with recursive = yes that of every child dataset too, see
    tree_changes), so they hold nothing common lacks; destroy them, newest
    first (in the children too), so that the winner can send its
    increment.  Only flocker
    snapshots: one not named by us (an operator's, zfs-auto-snapshot's)
    stays, and the winner's replication names it until an operator removes
    it (foreign_snapshots_message)."""
    zfs, ds, r = ctx.zfs, ctx.cfg.local.dataset, ctx.cfg.recursive
    local = zfs.listing(ds)
    after = snaps_after(local, common.guid)
    if not after:
        return []
    if changes_since(ctx.cfg, zfs, common.name, after[-1].name) != 0:
        raise ActionError("%s changed since %s after all; nothing was destroyed" % (ds,
                                                                                   common.name))
    names = [s.name for s in reversed(after) if is_flocker_snapshot(s.name)]
    foreign = [s.name for s in after if not is_flocker_snapshot(s.name)]
    for name in names:      # (-r: the same snapshot of every child, with recursive = yes)
        zfs.run(["destroy"] + (["-r"] if r else []) + ["%s@%s" % (ds, name)],
                retry_busy=True)
    text = ("destroyed %d snapshot(s) of %s after %s that held no change: %s"
            % (len(names), ds, common.name, ", ".join(names) or "none"))
    if foreign:
        text += ("; kept %d snapshot(s) not made by flocker-failover (%s): replication "
                 "to this node waits until an operator removes them"
                 % (len(foreign), ", ".join(foreign)))
    ctx.store.record_event("verdict", text, "warning" if foreign else "info")
    return names


def _win(ctx: Context, top: int, v: Verdict, peer_stopped) -> None:
    cfg = ctx.cfg
    st = ctx.store.node_state()
    if st.role != ROLE_MASTER or st.epoch < top:
        promote(ctx, promotion_epoch(cfg.local_index, top), v.reason)
    else:
        promote(ctx, st.epoch, v.reason)     # resumes: idempotent when serving
    sa = cfg.service.service_address
    if sa is not None:
        if peer_stopped is not None:
            peer_stopped(cfg.service.command_timeout + 10)
        add_service_address(sa)     # the loser may have held the address too
        announce_address(sa, cfg.service.announce_count, cfg.service.announce_interval)


# -- under a cluster manager (contrib/ocf/flocker) ----------------------------
#
# Pacemaker, not our daemon, decides the roles there; these one-shot actions
# give it what only we know.  compare: which replica is newer (promotion
# scores, and a promotion's last check).  rejoin: the peer is master by the
# cluster manager's decision, so this node becomes its slave, keeping what it
# wrote that the peer lacks, as a loser of a divergence does (the one that
# serves continues: the verdict's first rule).


def compare_replicas(cfg: Config, zfs: ZfsBase, peer: ZfsBase) -> dict:
    """This node's replica against the peer's: {relation, reachable, error,
    local, peer, peer_role, peer_epoch}.  An unreachable peer is no error:
    relation None, reachable false."""
    local = zfs.listing(cfg.local.dataset)
    out = {"relation": None, "reachable": False, "error": None,
           "local": _newest(local), "peer": None, "peer_role": None, "peer_epoch": None}
    try:
        remote = peer.listing(cfg.peer.dataset)
    except FlockerError as e:
        out["error"] = e.message
        return out
    marker = parse_role_marker(remote.props.get(ROLE_PROPERTY)) if remote else None
    out.update(reachable=True, relation=replica_relation(local, remote),
               peer=_newest(remote), peer_role=marker[1] if marker else None,
               peer_epoch=marker[2] if marker else None)
    return out


def _newest(listing: Optional[Listing]) -> Optional[dict]:
    if listing is None or not listing.snaps:
        return None
    return {"snapshot": listing.snaps[-1].name, "guid": listing.snaps[-1].guid}


def rejoin(ctx: Context, peer: ZfsBase) -> str:
    """The peer is master (its dataset's flocker:role says so): this node
    becomes its slave.  What this node has after their newest common
    snapshot (a tail a crashed master never sent, unsnapshotted writes) is
    kept as a preserved dataset, exactly as a loser's divergent data;
    snapshots after it that hold no change are dropped; then read-only,
    unmounted, role slave.  Returns what was done.  Refused, changing
    nothing, when the peer is not master or the two share no snapshot."""
    cfg, zfs, ds = ctx.cfg, ctx.zfs, ctx.cfg.local.dataset
    st = ctx.store.node_state()
    remote = peer.listing(cfg.peer.dataset)
    marker = parse_role_marker(remote.props.get(ROLE_PROPERTY)) if remote else None
    if marker is None or marker[1] != ROLE_MASTER:
        raise ActionError("%s is not master (its dataset says %s): nothing to rejoin; "
                          "nothing was changed" % (cfg.peer.name,
                                                   remote.props.get(ROLE_PROPERTY)
                                                   if remote else "nothing"))
    top = max(st.epoch, marker[2])
    reason = ("%s is master (epoch %d) by the cluster manager's decision: this node "
              "rejoins as its slave" % (cfg.peer.name, marker[2]))
    local = zfs.listing(ds)
    common = find_common(local, remote) if local is not None else None
    if local is None or not local.snaps:
        if st.role == ROLE_MASTER:
            demote(ctx, top, reason)
        return "%s holds no replica yet: the master's next cycle sends a full copy" % ds
    if common is None:
        raise NeedsOperator("%s and %s on %s share no snapshot: no automatic rejoin; "
                            "nothing was changed: compare them and keep one by hand"
                            % (ds, cfg.peer.dataset, cfg.peer.name))
    if st.role == ROLE_SLAVE and not snaps_after(local, common.guid):
        return "already %s's slave: nothing after %s@%s" % (cfg.peer.name, ds, common.name)
    stopped = st.role == ROLE_MASTER
    if stopped:
        # the peer is master by a cluster manager's (or an operator's)
        # decision: this node's writes stop whatever follows, as the older
        # of two serving masters stops (split_brain_yields)
        _stop_user_system(ctx, top, None)
        local = _snapshot_if_changed(cfg, zfs, local, st.epoch, wall_clock)
    after = snaps_after(local, common.guid)
    if after and changes_since(cfg, zfs, common.name, after[-1].name) > 0:
        if cfg.recursive:
            raise recursive_refusal(cfg, common.name, stopped)
        kept = preserve_divergence(ctx, common.name, top, reason, then_demote=True)
        text = ("rejoined as %s's slave; kept this node's data written after %s@%s as %s"
                % (cfg.peer.name, ds, common.name, kept))
        log.warning("%s", text)
    else:
        _drop_empty_divergence(ctx, common)
        if st.role != ROLE_SLAVE:
            demote(ctx, top, reason)
        text = ("rejoined as %s's slave; nothing after %s@%s to keep"
                % (cfg.peer.name, ds, common.name))
    ctx.store.record_event("rejoin", text, "warning" if after else "info")
    return text


# ===========================================================================
# 8. Status reports
# ===========================================================================
#
# What 'status', 'check' and the metrics file show, from the state file,
# the datasets and the running daemon's live values.


def replication_status(summary: dict, role: str, local: Optional[Listing],
                       now: float) -> dict:
    """The 'replication' part of status (pure).  On the master: from its
    history, the newest snapshot confirmed on the slave, and (with a listing
    of its dataset) how many of its snapshots the slave lacks.  On the
    slave: the newest replication snapshot its own replica holds."""
    ok, failed, last = summary["last_ok"], summary["last_failed"], summary["last"]
    newest = ok["snapshot"] if ok else None
    pending = None
    if role == ROLE_MASTER and local is not None:
        ours = [s for s in local.snaps if is_flocker_snapshot(s.name)]
        if ok is None:
            pending = len(ours)
        elif any(s.guid == ok["guid"] for s in local.snaps):
            after = snaps_after(local, ok["guid"])
            pending = len([s for s in after if is_flocker_snapshot(s.name)])
    elif role == ROLE_SLAVE and local is not None:
        ours = [s for s in local.snaps if is_flocker_snapshot(s.name)]
        newest = ours[-1].name if ours else None
    made = snapshot_time(newest) if newest else None
    return {
        "slave_newest_snapshot": newest,
        "lag_seconds": round(now - made, 3) if made is not None else None,
        "last_ok_at": ok["finished"] if ok else None,
        "last_ok_started": ok["started"] if ok else None,
        "pending": pending,
        "last_result": last["result"] if last else None,
        "last_error": failed["error"] if failed else None,
        "last_error_at": failed["finished"] if failed else None,
    }


def status_report(cfg: Config, now: Optional[float] = None,
                  live: Optional[dict] = None, zfs: Optional[ZfsBase] = None) -> dict:
    """Everything 'status' shows, as one JSON-able dict (see README).
    live: what the running daemon reported (its "status" answer), if any.
    With zfs, the replication part also reads this node's dataset."""
    now = wall_clock() if now is None else now
    with StateStore.open(cfg.local.state_db, readonly=True) as store:
        st = store.initialised_state()
        peer = store.peer(cfg.peer.name)
        last = store.last_replication()
        summary = store.replication_summary()
        preserved = store.preserved()
        events = store.events(limit=5)
    peer_out = {"node": cfg.peer.name, "last_seen": None, "age_seconds": None,
                "role": None, "epoch": None, "snapshot": None, "state": None}
    if peer is not None:
        peer_out.update(last_seen=peer["seen"], age_seconds=round(now - peer["seen"], 3),
                        role=peer["role"], epoch=peer["epoch"], snapshot=peer["snapshot"])
    if live is not None:
        lp = live["peer"]
        peer_out["state"] = lp["state"]
        if lp.get("last_seen_age_seconds") is not None:
            # live values: ages from the daemon's monotonic clock
            peer_out.update(age_seconds=lp["last_seen_age_seconds"],
                            last_seen=now - lp["last_seen_age_seconds"],
                            role=lp.get("role"), epoch=lp.get("epoch"),
                            snapshot=lp.get("snapshot"))
    local, key = None, None
    if zfs is not None:
        try:
            local = zfs.listing(cfg.local.dataset)
            key = zfs.key_state(cfg.local.dataset)
        except FlockerError as e:
            log.warning("status: cannot list %s: %s", cfg.local.dataset, e.message)
    if key is not None:
        key["problem"] = key_problem(key, cfg.service.key_command) or None
    return {
        "schema": 1,
        "version": VERSION,
        "cluster": cfg.name,
        "node": st.node,
        "role": st.role,
        "epoch": st.epoch,
        "generation": st.generation,
        "outdated": st.outdated,
        "dataset": cfg.local.dataset,
        "state_db": cfg.local.state_db,
        "daemon": live,
        "peer": peer_out,
        "last_replication": last,
        "replication": replication_status(summary, st.role, local, now),
        "preserved": preserved,
        "events": events,
        "encryption": key,
    }


def _fmt_time(ts: Optional[float]) -> str:
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _fmt_age(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return "%.1f s ago" % seconds
    if seconds < 7200:
        return "%d min ago" % (seconds // 60)
    if seconds < 172800:
        return "%.1f h ago" % (seconds / 3600)
    return "%.1f days ago" % (seconds / 86400)


def format_status(r: dict) -> str:
    """status_report's dict as the lines 'status' prints: this node, the
    daemon's live view (service, decision, arbitrator, witness), the peer
    and the links, replication, encryption, preserved data."""
    lines = [
        "cluster     %s" % r["cluster"],
        "node        %s (this host), dataset %s" % (r["node"], r["dataset"]),
        "role        %s, epoch %d%s" % (r["role"], r["epoch"],
                                        ", replica known to be OUTDATED" if r["outdated"] else ""),
        "daemon      %s" % ("running" if r["daemon"] else "not running (values from the state file)"),
    ]
    d = r["daemon"]
    if d and "serving" in d:
        lines += _status_service(d)
    lines += _status_peer(r["peer"], d)
    lines += _status_replication(r)
    enc = r.get("encryption")
    if enc is not None:
        lines.append("encryption  %s: key %s (keylocation %s)%s" % (
            enc["encryptionroot"], "loaded" if enc["keystatus"] == "available"
            else "NOT loaded", enc["keylocation"],
            "; " + enc["problem"] if enc.get("problem") else ""))
    for pr in r["preserved"]:
        lines.append("preserved   %s (epoch %d, %s): %s"
                     % (pr["dataset"], pr["epoch"], _fmt_time(pr["created"]), pr["reason"]))
    return "\n".join(lines)


def _status_service(d: dict) -> List[str]:
    """status: what the running daemon says of the service, its last
    decision, the arbitrator and the witness."""
    jobs = d.get("jobs") or {}
    if d["serving"]:
        service = "RUNNING here (this node is the serving master)"
    elif "role" in jobs and (d.get("decision") or {}).get("kind") in (DECIDE_PROMOTE,
                                                                     DECIDE_RESUME):
        # the start command may have run already: the promotion serves once
        # its last steps (the role marker, notify_command) are done too
        service = "STARTING here (%s running for %.1f s)" % (d["decision"]["kind"],
                                                              jobs["role"])
    else:
        service = "not running here"
    lines = ["service     " + service]
    if d.get("decision"):
        lines.append("decision    %s: %s" % (d["decision"]["kind"], d["decision"]["reason"]))
    if d.get("arbitrator"):
        lines.append("arbitrator  %s (%s, checked %s)" % (
            "reachable" if d["arbitrator"]["reachable"] else "NOT reachable",
            d["arbitrator"]["how"], _fmt_age(d["arbitrator"]["age_seconds"])))
    w = d.get("witness")
    if w:
        lines.append("witness     %s %s; %s%s" % (
            w["address"], "answers" if w["reachable"] else "does NOT answer" + (
                " (%s)" % w["error"] if w["error"] else ""),
            "this node holds its lease (%.1f s left)" % w["lease_left_seconds"]
            if w["lease_left_seconds"] > 0 else "this node holds no lease",
            "" if w["reachable"] else ": no failover is possible until it answers"))
    return lines


def _status_peer(p: dict, d: Optional[dict]) -> List[str]:
    """status: the peer as last heard; with a daemon, its state, each
    link, the rejected packets, the loop's lag, jobs and a transfer."""
    lines = []
    if p["last_seen"] is None:
        lines.append("peer        %s: never seen" % p["node"])
    else:
        lines.append("peer        %s: last seen %s (%s), role %s, epoch %s"
                     % (p["node"], _fmt_time(p["last_seen"]), _fmt_age(p["age_seconds"]),
                        p["role"] or "?", p["epoch"] if p["epoch"] is not None else "?"))
    if d:
        lines.append("peer state  %s for %.1f s; %d dead verdict(s) since the daemon started"
                     % (d["peer"]["state"], d["peer"]["state_age_seconds"],
                        d["peer"]["dead_verdicts"]))
        for lk in d["links"]:
            lines.append("link %d      %s <-> %s: %s, last heartbeat %s, largest gap %.3f s"
                         % (lk["index"], lk["local"], lk["peer"], lk["state"],
                            _fmt_age(lk["last_seen_age_seconds"]) or "never",
                            lk["max_gap_seconds"]))
        bad = ", ".join("%s %d" % kv for kv in sorted(d["rejected"].items()) if kv[1])
        lines.append("rejected    %s" % (bad or "none"))
        lines.append("loop lag    worst %.3f s, last %.3f s, %d stall(s) (over the last %s)"
                     % (d["worst_lag_seconds"], d["last_lag_seconds"], d["stalls"],
                        _fmt_age(d["stats_age_seconds"]).replace(" ago", "")))
        if d["jobs"]:
            lines.append("jobs        %s" % ", ".join(
                "%s (%.1f s)" % kv for kv in sorted(d["jobs"].items())))
        if d.get("transfer"):
            lines.append("transfer    %s" % format_progress(d["transfer"]))
    return lines


def _status_replication(r: dict) -> List[str]:
    """status: on the slave, the replica it holds; on the master, the last
    cycle, the lag of the slave's newest snapshot and the last error."""
    lines = []
    last = r["last_replication"]
    rep = r.get("replication")
    if r["role"] == ROLE_SLAVE:
        # the master runs the cycles: what tells here is the replica held
        newest = rep["slave_newest_snapshot"] if rep else None
        made = snapshot_time(newest) if newest else None
        lines.append("replica     %s" % (
            "holds no replication snapshot yet" if newest is None else
            "holds %s, made %s (%s)" % (newest, _fmt_time(made), _fmt_age(rep["lag_seconds"]))
            if made is not None else "holds %s" % newest))
        rep = None
    elif last is None:
        lines.append("replicated  never")
    else:
        lines.append("replicated  %s %s at %s%s" % (
            last["snapshot"] or "(a cycle)", last["result"],
            _fmt_time(last["finished"] or last["started"]),
            (": " + last["error"]) if last["error"] else ""))
    if rep and rep["slave_newest_snapshot"]:
        lines.append("lag         newest snapshot on the slave: %s%s%s" % (
            rep["slave_newest_snapshot"],
            " (%s)" % _fmt_age(rep["lag_seconds"]).replace(" ago", " old")
            if rep["lag_seconds"] is not None else "",
            ", %d pending here" % rep["pending"] if rep["pending"] else ""))
    elif rep and rep["pending"]:
        lines.append("lag         the slave has no replica yet, %d pending here"
                     % rep["pending"])
    if rep and rep["last_error"]:
        lines.append("repl error  %s: %s" % (_fmt_time(rep["last_error_at"]),
                                             rep["last_error"]))
    return lines


# -- check (monitoring plugins) and metrics (Prometheus) ----------------------

CHECK_OK, CHECK_WARNING, CHECK_CRITICAL, CHECK_UNKNOWN = 0, 1, 2, 3
CHECK_NAMES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")


def replication_lag(report: dict, now: float) -> Tuple[Optional[float], str]:
    """For check: for how many seconds writes on the master may be missing
    on the slave, and on what that rests (pure; None: there is no replica).

    Where the slave is known to hold the master's newest snapshot, the lag
    is the age of that knowledge: on the master, since the start of its last
    successful cycle (nothing pending); on the slave, since it heard the
    master name that snapshot as its newest.  Otherwise it is the age of the newest
    snapshot the slave holds.  So a quiet dataset, which takes no new
    snapshots, shows no lag while its cycles succeed."""
    rep = report.get("replication") or {}
    newest = rep.get("slave_newest_snapshot")
    if newest is None:
        return None, "no replica"
    peer = report.get("peer") or {}
    if (report["role"] == ROLE_MASTER and rep.get("pending") == 0
            and rep.get("last_ok_started") is not None):
        # the last successful cycle found nothing newer than what it left
        # on the slave when it started, or sent a snapshot taken after that
        made = snapshot_time(newest) or 0.0
        return (max(0.0, now - max(rep["last_ok_started"], made)),
                "since the last successful cycle")
    if (report["role"] == ROLE_SLAVE and peer.get("snapshot") == newest
            and peer.get("age_seconds") is not None):
        return max(0.0, peer["age_seconds"]), "since the master last named it its newest"
    if rep.get("lag_seconds") is None:
        return None, "no replica"
    return max(0.0, rep["lag_seconds"]), "age of the slave's newest snapshot %s" % newest


def check_verdict(report: dict, expect_daemon: bool = True,
                  warn: Optional[float] = None, crit: Optional[float] = None,
                  now: Optional[float] = None) -> Tuple[int, str, str]:
    """Monitoring verdict from a status report: (code, text, perfdata),
    the monitoring-plugins way (0 OK, 1 WARNING, 2 CRITICAL).  warn and
    crit: replication lag thresholds in seconds (see replication_lag)."""
    now = wall_clock() if now is None else now
    problems = []   # type: List[Tuple[int, str]]
    peer, daemon = report["peer"], report["daemon"]
    role = report["role"]
    if daemon is None and expect_daemon:
        problems.append((CHECK_CRITICAL, "daemon not running"))
    alive = peer.get("state") == "alive"
    div = (daemon or {}).get("divergence") or {}
    if div.get("unresolved"):
        problems.append((CHECK_CRITICAL, "split brain unresolved, an operator must decide "
                         "('resolve --winner NODE'): %s" % div["unresolved"]))
    elif role == ROLE_MASTER and alive and peer.get("role") == ROLE_MASTER:
        problems.append((CHECK_CRITICAL, "split brain: %s is master too" % peer["node"]))
    if role == ROLE_SLAVE and report.get("outdated"):
        problems.append((CHECK_WARNING, "this replica is OUTDATED: no automatic takeover "
                         "('promote --force' if the master is lost)"))
    if role == ROLE_SLAVE and not (alive and peer.get("role") == ROLE_MASTER):
        problems.append((CHECK_CRITICAL, "no master: this node is slave and %s is %s"
                         % (peer["node"], "master but not heard" if peer.get("role") ==
                            ROLE_MASTER else (peer.get("role") or "unknown"))))
    if daemon is not None and not alive:
        problems.append((CHECK_WARNING, "peer %s %s: running on one host"
                         % (peer["node"], peer.get("state") or "unknown")))
    problems += _witness_problems(report)
    if role == ROLE_SLAVE and (report.get("encryption") or {}).get("problem"):
        problems.append((CHECK_CRITICAL, "this node could not take over: %s"
                         % report["encryption"]["problem"]))
    if report["preserved"]:
        problems.append((CHECK_WARNING, "%d preserved divergent dataset(s) waiting for the "
                         "operator: %s" % (len(report["preserved"]), ", ".join(
                             p["dataset"] for p in report["preserved"]))))
    lag, basis = replication_lag(report, now)
    rep = report.get("replication") or {}
    if warn is not None or crit is not None:
        slave = peer["node"] if role == ROLE_MASTER else report["node"]
        error = rep.get("last_error")
        why = (" (last replication error: %s)" % (error if len(error) <= 200
                                                  else error[:200] + "...")) if error else ""
        if lag is None:
            problems.append((CHECK_CRITICAL, "no replica on %s yet%s%s" % (
                slave, ", %d snapshot(s) pending" % rep["pending"] if rep.get("pending")
                else "", why)))
        else:
            for limit, code, name in ((crit, CHECK_CRITICAL, "crit"),
                                      (warn, CHECK_WARNING, "warn")):
                if limit is not None and lag > limit:
                    problems.append((code, "replication lag %.0f s > %s %g s (%s)%s"
                                     % (lag, name, limit, basis, why)))
                    break
    code = max([c for c, _ in problems] or [CHECK_OK])
    head = "%s %s epoch %d, peer %s %s" % (report["node"], role, report["epoch"],
                                         peer["node"], peer.get("state") or "unknown")
    if lag is not None:
        head += ", replication lag %.0f s" % lag
    text = "; ".join(t for c, t in sorted(problems, key=lambda p: -p[0])) or head
    if problems:
        text = "%s (%s)" % (text, head)
    rejected = sum((daemon or {}).get("rejected", {}).values())
    perf = "epoch=%d peer_alive=%d preserved=%d rejected=%dc" % (
        report["epoch"], 1 if alive else 0, len(report["preserved"]), rejected)
    if peer.get("age_seconds") is not None:
        perf += " peer_age=%.1fs" % peer["age_seconds"]
    if lag is not None:
        perf += " lag=%.1fs;%s;%s;0" % (lag, "" if warn is None else "%g" % warn,
                                        "" if crit is None else "%g" % crit)
    if rep.get("pending") is not None:
        perf += " pending=%d" % rep["pending"]
    return code, text, perf


def _witness_problems(report: dict) -> List[Tuple[int, str]]:
    """check: what the witness's state means for a failover."""
    w = (report.get("daemon") or {}).get("witness")
    if not w or w["reachable"]:
        return []
    why = "the witness %s does not answer%s" % (w["address"], " (%s)" % w["error"]
                                                 if w.get("error") else "")
    peer = report["peer"]
    if report["role"] == ROLE_SLAVE and peer.get("state") != "alive":
        return [(CHECK_CRITICAL, "failover is not possible: the master is gone and %s, so "
                                 "this node cannot obtain its lease ('promote --force' takes "
                                 "over without it, if the master is surely down)" % why)]
    return [(CHECK_WARNING, "%s: no failover is possible until it answers again" % why)]


def render_metrics(cfg: Config, live: dict, now: float) -> str:
    """The daemon's live status in the Prometheus text format (for
    node_exporter's textfile collector); names and meanings in README."""
    out = []

    def metric(name, kind, help_, samples):
        out.append("# HELP flocker_%s %s" % (name, help_))
        out.append("# TYPE flocker_%s %s" % (name, kind))
        for labels, value in samples:
            lab = ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace('"', '\\"'))
                           for k, v in sorted(dict(labels, cluster=cfg.name,
                                                   node=cfg.local_name).items()))
            out.append("flocker_%s{%s} %s" % (name, lab, repr(float(value))
                                             if isinstance(value, float) else value))

    peer = live["peer"]
    lt = live.get("last_transfer")
    metric("master", "gauge", "1 when this node's role is master.",
           [({}, int(live["role"] == ROLE_MASTER))])
    metric("serving", "gauge", "1 while this node runs the user system.",
           [({}, int(bool(live.get("serving"))))])
    metric("epoch", "gauge", "The node's epoch (raised by every promotion).",
           [({}, live["epoch"])])
    metric("outdated", "gauge", "1 when this node's replica is known to lack the master's data.",
           [({}, int(bool(live.get("outdated"))))])
    metric("peer_alive", "gauge", "1 while a valid heartbeat came within dead_time.",
           [({"peer": peer["node"]}, int(peer["state"] == "alive"))])
    if peer.get("last_seen_age_seconds") is not None:
        metric("peer_last_heartbeat_age_seconds", "gauge",
               "Seconds since the last valid heartbeat of the peer.",
               [({"peer": peer["node"]}, float(peer["last_seen_age_seconds"]))])
    if lt is not None:
        metric("replication_lag_seconds", "gauge",
               "Seconds since the start of the newest successful replication cycle "
               "(the slave holds everything snapshotted then).",
               [({}, round(now - lt["started"], 3))])
        metric("replication_last_transfer_bytes", "gauge",
               "Bytes sent by the newest successful cycle (0: nothing changed).",
               [({}, lt["bytes"])])
        metric("replication_last_transfer_seconds", "gauge",
               "Duration of the newest successful transfer.", [({}, float(lt["seconds"]))])
    metric("replication_failures", "gauge", "Failed replication cycles in a row.",
           [({}, live.get("replication_failures", 0))])
    metric("heartbeats_rejected_total", "counter",
           "Heartbeat packets rejected since the daemon started, by reason.",
           [({"reason": r}, n) for r, n in sorted(live["rejected"].items())])
    metric("dead_verdicts_total", "counter", "Times the peer was judged dead.",
           [({"peer": peer["node"]}, peer["dead_verdicts"])])
    metric("promotions_total", "counter", "Role changes to master by this daemon "
           "(failovers and switchovers).", [({}, live.get("promotions", 0))])
    metric("demotions_total", "counter", "Role changes to slave by this daemon.",
           [({}, live.get("demotions", 0))])
    metric("check_failures", "gauge", "Failed runs of check_command in a row.",
           [({}, live.get("check_failures", 0))])
    tr = live.get("transfer")
    metric("transfer_bytes", "gauge", "Bytes sent so far by the transfer in flight (0: none).",
           [({}, tr["bytes"] if tr else 0)])
    if tr and tr["total"] is not None:
        metric("transfer_total_bytes", "gauge", "Expected size of the transfer in flight "
               "(zfs send -n -P; absent where zfs cannot tell).", [({}, tr["total"])])
    w = live.get("witness")
    if w:
        metric("witness_reachable", "gauge", "1 while the witness answers (failover is "
               "possible only then).", [({}, int(bool(w["reachable"])))])
        metric("witness_lease_left_seconds", "gauge", "Seconds left of this node's lease "
               "of the witness, by its own clock (0: it holds none).",
               [({}, float(w["lease_left_seconds"]))])
    return "\n".join(out) + "\n"


# ===========================================================================
# 9. The daemon
# ===========================================================================
#
# One thread runs the event loop (Daemon, at the end of this section): the
# heartbeat sockets, the timers, the control socket, and two wake-up
# sockets (signals; finished jobs).  It never waits for anything slow.  It
# owns three objects, each in its own part of this section:
#
#   - the role keeper (RoleKeeper): what this node is and does next; no
#     I/O and no clock of its own, like PeerTracker, which it reads;
#   - the heartbeat link (HeartbeatLink): the heartbeat sockets;
#   - the control server (ControlServer): the control socket.
#
# Slow work runs elsewhere:
#
#   - JobRunner: each job (check_command, the snapshot scan, the
#     replication cycle, a role change, the arbitrator and witness probes)
#     runs fn(stop) in its own thread, at most one job of a name at a time;
#     when it ends, its on_done callback runs on the loop.  A job that runs
#     commands passes `stop` on to run_command, so that SIGTERM kills what
#     it started.
#   - StoreWriter: one thread owns the daemon's sqlite connection and
#     applies writes (events, peer observations) in order.
#
# The rule: only the loop's thread assigns the state of the loop and of
# what it owns.  A job reads what it needs and hands what it found back as
# its result, to its on_done on the loop, or through jobs.call_soon() when
# the loop must know before the job ends; the functions that run on a job's
# thread are in "the jobs" (DaemonJobs) or named job.
#
# Liveness uses time.monotonic() only.  Each timer firing measures how late
# the loop was (lag); a lag above half the dead time means this process was
# not running (stopped, swapped out, a suspended VM), and the peer is then
# judged only on heartbeats that arrive after waking up.
#
# Control socket: <state_db>.ctl/control.sock (directory 0700, socket 0600,
# peers checked with SO_PEERCRED: root or the daemon's user).  A client
# sends one JSON object on one line and reads one JSON line back, then the
# daemon closes the connection (at most 8 clients, 5 s each, 4 KiB request):
#   {"cmd": "ping"}         -> {"ok": true, "pid": N}
#   {"cmd": "status"}       -> {"ok": true, "status": {...live values...}}
#   {"cmd": "reset-stats"}  -> {"ok": true}  (rejection counters, largest
#                              gaps and worst lag start again from zero)
#   {"cmd": "promote"|"demote", ...}, {"cmd": "resolve", "winner": NODE}:
#                              the operator's commands (see section 10)
#   {"cmd": "discard-preserved", "dataset": NAME}
#                           -> {"ok": true}: a job destroys it with the checks
#                              of discard_preserved(); status's "discard"
#                              says when it is done or why it failed
#   anything else           -> {"ok": false, "error": "..."}

PEER_SAVE_EVERY = 5.0        # seconds between refreshes of the persisted peer row
REJECT_SUMMARY_EVERY = 10.0  # seconds between "rejected N packets" log lines
REJECT_DETAIL_EVERY = 60.0   # seconds between detailed lines for one reason
METRICS_EVERY = 5.0          # seconds between two writes of metrics_file
SWITCHOVER_TIMEOUT = 120.0    # seconds a slave asks its master to hand over (+ commands)
HANDOVER_CYCLE_WAIT = 10.0   # seconds a switchover lets the cycle in flight finish
OUTDATED_AFTER_FAILURES = 3  # failed cycles in a row before the slave is told it is outdated
RECV_BATCH = 128             # datagrams read per socket before the loop looks at timers
CONTROL_MAX_CLIENTS = 8
CONTROL_TIMEOUT = 5.0        # seconds a control client may take
CONTROL_MAX_REQUEST = 4096   # bytes
STALL_FRACTION = 0.5         # loop later than dead_time * this: it was stalled
VERDICT_SLACK = 0.0001       # s: the liveness check runs this long after a verdict is due


EVENT_TRIM_INTERVAL = 3600.0   # seconds between two trims of the event log


def _trim_events(store: StateStore, cfg: Config) -> None:
    removed = store.trim_events(cfg.event_log_keep_rows, cfg.event_log_keep_days)
    if removed:
        log.info("event log: removed the %d oldest event(s) (event_log_keep_rows = %d, "
                 "event_log_keep_days = %g)", removed, cfg.event_log_keep_rows,
                 cfg.event_log_keep_days)


def control_socket_path(state_db: str) -> str:
    """The daemon's control socket, in a private directory beside the state file."""
    return os.path.join(state_db + ".ctl", "control.sock")


class LinkView:
    """What one link (own address i <-> peer address i) has carried."""

    def __init__(self, index: int, local: str, peer: str) -> None:
        self.index = index
        self.local = local
        self.peer = peer
        self.last_seen = None      # type: Optional[float]  # monotonic
        self.state = "unknown"     # unknown / up / down
        self.received = 0
        self.sent = 0
        self.send_errors = 0
        self.max_gap = 0.0         # largest time between two valid packets


class PeerTracker:
    """Everything this node concludes from the packets it receives: which
    are valid, which links are up, whether the peer is alive.  No I/O and
    no clock of its own (callers pass monotonic `now`), so tests drive it
    with invented packets and times.

    A packet is a sign of life only when it echoes one of our own packets
    sent within the last dead_time (see sent()); an authentic packet that
    does not (the peer has not heard us yet, or a recorded packet replayed)
    is counted as unconfirmed and only updates what we echo back."""

    SENT_MEMORY = 4096   # own packets remembered at most

    def __init__(self, cluster: str, peer: str, keys, links: Sequence[LinkView],
                 dead_time: float, start: float, min_generation: int = 0,
                 generation: int = 0) -> None:
        self.generation = generation   # our own boot generation
        self._sent = collections.deque()  # type: collections.deque
        self._sent_at = {}                # type: Dict[int, float]
        self.unconfirmed = 0
        self.cluster = cluster
        self.peer = peer
        self.keys = keys
        self.links = list(links)
        self.dead_time = dead_time
        self.start = start
        self.awake_since = start   # judge liveness only on what came after this
        self.window = ReplayWindow(min_generation)
        # the newest of our packets that an accepted packet echoed
        self._echo_high = 0
        self.rejected = {r: 0 for r in REJECT_REASONS}
        self.last = None           # type: Optional[Heartbeat]
        self.last_seen = None      # type: Optional[float]
        self.state = "unknown"     # unknown / alive / dead
        self.state_since = start
        self.dead_verdicts = 0
        self.silence_at_verdict = None  # type: Optional[float]
        self.dead_since = None     # type: Optional[float]  # when the silence passed dead_time
        self.stalls = 0
        # the newest authentic, new packet, confirmed or not, and when it
        # came: a peer that does not hear us (one direction of the link
        # lost) still tells us that it is master (see Facts.peer_claim_epoch)
        self.claim = None          # type: Optional[Heartbeat]
        self.claim_seen = None     # type: Optional[float]
        # since when every authentic packet has been unconfirmed (None: the
        # newest was confirmed): a link that just healed confirms within
        # moments, a direction that stays lost never does
        self.unconfirmed_since = None  # type: Optional[float]
        # ... and whether that streak began after silence (no authentic
        # packet for over dead_time: the link healed after a cut), when
        # the first round trip may take longer than on a working link
        self.unconfirmed_after_silence = False
        # (old, new) boot generation of a peer that restarted from older
        # state and proved it is live; the daemon logs it once and clears it
        self.generation_dropped = None  # type: Optional[Tuple[int, int]]

    def receive(self, packet: bytes, link: int,
                now: float) -> Tuple[Optional[Heartbeat], Optional[WireReject]]:
        """Judge one datagram that came in on link; returns (heartbeat, None)
        when accepted as a sign of life, (None, the rejection) when
        rejected (only its counter rises), and (None, None) when authentic
        and new but unconfirmed (see the class notes)."""
        try:
            hb = decode_heartbeat(packet, self.keys)
            check_origin(hb, self.cluster, self.peer)
            sent_at = (self._sent_at.get(hb.echo_sequence)
                       if hb.echo_generation == self.generation else None)
            confirmed = sent_at is not None and now - sent_at <= self.dead_time
            reason = self.window.check(hb.generation, hb.sequence)
            if confirmed and (reason == "old_generation" or (
                    reason == "replay" and hb.echo_sequence > self._echo_high)):
                # it answers a packet of ours from this boot, so it is live:
                # the peer restarted from older state (its state file was
                # restored from a backup, a VM snapshot reverted).  Its
                # generation counts from there; never lock it out.  In a
                # generation it used before, its sequence starts again
                # below the window ("replay"): a copy of a packet we took
                # would echo no packet of ours newer than all it answered.
                self.generation_dropped = (self.window.generation, hb.generation)
                self.window = ReplayWindow(hb.generation)
                reason = None
            if reason is not None:
                raise WireReject(reason, "generation %d, sequence %d"
                                 % (hb.generation, hb.sequence))
        except WireReject as e:
            self.rejected[e.reason] += 1
            return None, e
        self.window.accept(hb.generation, hb.sequence)
        if hb.echo_generation == self.generation:
            self._echo_high = max(self._echo_high, hb.echo_sequence)
        silence = self.claim_seen is not None and now - self.claim_seen > self.dead_time
        self.claim, self.claim_seen = hb, now
        if not confirmed:
            self.unconfirmed += 1
            # a streak begins at the first unconfirmed packet, and again
            # after a silence: one from before a cut does not go on after
            # the heal (a master stepped down the moment the link came up)
            if self.unconfirmed_since is None or silence:
                self.unconfirmed_since = now
                self.unconfirmed_after_silence = silence
            return None, None
        self.unconfirmed_since = None
        lv = self.links[link]
        if lv.last_seen is not None:
            lv.max_gap = max(lv.max_gap, now - lv.last_seen)
        lv.last_seen = now
        lv.received += 1
        self.last = hb
        self.last_seen = now
        return hb, None

    def sent(self, sequence: int, now: float) -> None:
        """Note that we sent our packet `sequence` at `now`."""
        self._sent.append((sequence, now))
        self._sent_at[sequence] = now
        while self._sent and (now - self._sent[0][1] > self.dead_time
                              or len(self._sent) > self.SENT_MEMORY):
            del self._sent_at[self._sent.popleft()[0]]

    def echo(self) -> Tuple[int, int]:
        """What our packets echo: the newest authentic packet of the peer."""
        w = self.window
        return (w.generation, w.highest) if w.highest else (0, 0)

    def woke_from_stall(self, now: float) -> None:
        self.awake_since = now
        self.stalls += 1

    def one_way_claim(self, now: float, settle: float) -> Optional[Heartbeat]:
        """The peer's newest authentic packet when it came within dead_time
        (and after a stall) while none of its packets has echoed ours for
        at least `settle` seconds: it does not hear us (one direction of
        the link is lost), though we hear it.  Else None."""
        if (self.claim_seen is None or self.claim_seen < self.awake_since
                or now - self.claim_seen > self.dead_time
                or self.unconfirmed_since is None or now - self.unconfirmed_since < settle):
            return None
        return self.claim

    def evaluate(self, now: float) -> List[str]:
        """Update link and peer states; returns messages for what changed."""
        changes = []
        due = []
        for lv in self.links:
            if lv.last_seen is not None and lv.last_seen >= self.awake_since:
                basis = lv.last_seen
            else:
                basis = self.awake_since
            due.append(basis + self.dead_time)
            if now - basis > self.dead_time:
                state = "down"
            elif lv.last_seen is not None:
                state = "up"
            else:
                state = "unknown"
            if state != lv.state and not (lv.state == "unknown" and state == "down"
                                          and lv.last_seen is None):
                changes.append("link %d (%s <-> %s) is %s" % (lv.index, lv.local, lv.peer, state))
            lv.state = state
        states = [lv.state for lv in self.links]
        if "up" in states:
            peer_state = "alive"
        elif all(s == "down" for s in states):
            peer_state = "dead"
        else:
            peer_state = "unknown"
        if peer_state != self.state:
            if peer_state == "dead":
                self.dead_verdicts += 1
                self.dead_since = max(due)
                self.silence_at_verdict = (None if self.last_seen is None
                                           else now - self.last_seen)
                changes.append("peer %s is dead: no valid heartbeat for %s" % (
                    self.peer, "%.2f s" % self.silence_at_verdict
                    if self.silence_at_verdict is not None else "ever since this daemon started"))
            else:
                changes.append("peer %s is %s" % (self.peer, peer_state))
            self.state = peer_state
            self.state_since = now
        return changes

    def next_verdict(self) -> Optional[float]:
        """The moment evaluate() would first find a link down that is not
        down now, if nothing comes before (its rule: a silence longer than
        dead_time, since the newest packet or since awake_since); None when
        every link is down.  The daemon's loop wakes then, so that a dead
        verdict is not up to a liveness tick late."""
        due = [(lv.last_seen if lv.last_seen is not None and lv.last_seen >= self.awake_since
                else self.awake_since) + self.dead_time
               for lv in self.links if lv.state != "down"]
        return min(due) if due else None

    def reset_stats(self) -> None:
        self.rejected = {r: 0 for r in REJECT_REASONS}
        for lv in self.links:
            lv.max_gap = 0.0


# -- the role keeper ----------------------------------------------------------
#
# What this node is and what it does next: role, epoch, whether it serves,
# the release, the outdated mark, the switchover, the arbitrator's and the
# witness's answers, the divergence being resolved.  Every liveness tick
# the loop asks next_action(now): the keeper gathers the facts, asks
# decide() (section 6) and answers with the role action to run, or None.
# The loop runs it in the job "role" (one role change at a time; while it
# runs nothing else is decided) and hands its outcome back to role_done().
# The actions are the crash-safe ones of section 7; a failed one is
# finished by recover_intent() on the next try, after a growing pause.
#
# Like PeerTracker it has no I/O and no clock of its own: callers pass
# monotonic `now`, and what is to be logged, put in the event log or
# written to the state file leaves as a Note through report(), which the
# daemon carries out and a test collects.

Note = collections.namedtuple("Note", "level message event write quiet",
                              defaults=(None, None, None))
Note.__doc__ = """What the keeper (or the heartbeat link) has to say: a log line at
`level` (None: no line); `event` (kind, text, level) for the event log;
`write` fn(store) for the state file; `quiet` (topic, seconds): the line
at most once per that many seconds."""


@record
class RoleAction:
    """What the job "role" is to do: kind is a DECIDE_* (or ROLE_RECOVER:
    only finish an interrupted action), with what its action needs."""
    kind: str
    reason: str = ""
    epoch: int = 0
    serving: bool = False          # resolve: this node served when it began
    yield_first: bool = False      # resolve: stop the user system before anything else
    winner: Optional[str] = None   # resolve: the operator's choice
    decided: float = 0.0           # when the keeper handed it out (monotonic)
    deadline: Optional[float] = None  # promote: when the peer's silence passed dead_time


class WitnessWatch:
    """The witness's lease as this node knows it (see "the witness's lease"
    in section 6): what the witness job's answers said, turned into
    decide()'s facts, status and log lines.  No I/O and no clock of its own.

    Every heartbeat_interval a job asks the witness: for the lease when
    this node is master or its peer is not alive, else only about it (a
    question, lease 0: does it answer, who holds it), so that status and
    check can tell whether a failover is possible.  The loop only reads
    the outcome; it never waits for the witness."""

    def __init__(self, cfg: Config, report) -> None:
        self.cfg = cfg
        self.report = report
        self.view = WitnessView(cfg.local_name)  # the lease, from the answers
        self.said = None           # type: Optional[str]  # what was last logged about it
        self.stalls = 0            # the tracker's stalls when the lease was last judged
        self.forcing = False       # slave: the operator forces the coming takeover
        self.waived = False        # master by 'promote --force': it serves without
        #                            the lease until it has held it once

    def name(self) -> str:
        return ("[%s]:%d" if ":" in self.cfg.witness[0] else "%s:%d") % self.cfg.witness

    def answered(self, result, error, now: float) -> None:
        """The witness job's outcome: (sent_at, answer or None, why, refused)."""
        if error is not None:
            self.report(Note(logging.ERROR, "cannot ask the witness: %s" % error,
                             quiet=("witness", 60.0)))
            return
        if result is None:
            return
        sent_at, answer, why, refused = result
        self.view.rejected += refused
        if refused:
            self.report(Note(logging.WARNING, "refused %d datagram(s) that were not the "
                             "witness's answer to this node's request (forged, replayed or "
                             "late)" % refused, quiet=("witness-refused", 60.0)))
        if answer is None:
            self.view.failed(why, now)
            said = "the witness %s does NOT answer: %s" % (self.name(), why)
        else:
            self.view.answered(sent_at, answer, now)
            said = self.summary(answer)
        key = re.sub(r"[0-9.]+ s\b", "", said)
        if key != self.said:
            self.said = key
            bad = answer is None or answer.answer == WITNESS_REFUSED
            self.report(Note(logging.WARNING if bad else logging.INFO, said,
                             event=("witness", said, "warning" if bad else "info")))

    def summary(self, a: WitnessMessage) -> str:
        if a.answer == WITNESS_GRANTED:
            return "the witness lends this node its lease (%g s)" % (a.lease_ms / 1000.0)
        if a.answer == WITNESS_HELD:
            return ("the witness lends its lease to %s" % a.holder if a.holder and
                    a.holder != self.cfg.local_name else
                    "the witness answers; %s" % ("this node holds its lease" if a.holder else
                                                 "nobody holds its lease"))
        if a.answer == WITNESS_WAITING:
            return ("the witness answers, but lends nothing for %.1f s (it restarted and "
                    "waits out the leases it may have lent)" % (a.wait_ms / 1000.0))
        return "the witness refuses: %s" % a.holder

    def facts(self, role: str, force: bool, stalls: int, now: float
              ) -> Tuple[Optional[float], bool]:
        """(Facts.witness, Facts.witness_other); a stall voids the lease.
        A master that an operator made so by 'promote --force' (the master
        dead, the witness down) is not held to the lease (None) until it
        has held it once: the operator's word stands in for it."""
        if self.cfg.witness is None:
            return None, False
        if stalls != self.stalls:
            self.stalls = stalls
            if self.view.expires is not None:
                self.report(Note(logging.WARNING, "this daemon was stalled: it no longer "
                                 "counts on the witness's lease"))
            self.view.lost(now)
        left = self.view.left(now)
        if role == ROLE_SLAVE:
            self.forcing, self.waived = force, False
        elif self.forcing:
            self.forcing, self.waived = False, True
        if left > 0:
            self.waived = False
        if self.waived:
            return None, False
        return left, self.view.other_holds()

    def status(self, now: float) -> Optional[dict]:
        if self.cfg.witness is None:
            return None
        w, cfg = self.view, self.cfg
        a = w.answer
        return {
            "address": self.name(),
            "reachable": w.reachable(now, 3 * cfg.heartbeat_interval + cfg.witness_timeout),
            "lease_left_seconds": round(w.left(now), 3),
            "waived": self.waived,
            "holder": None if a is None else (
                cfg.local_name if a.answer == WITNESS_GRANTED else
                (a.holder or None) if a.answer == WITNESS_HELD else None),
            "answer": None if a is None else WITNESS_ANSWERS[a.answer],
            "said": self.said,
            "answer_age_seconds": None if w.answered_at is None else
            round(now - w.answered_at, 3),
            "error": w.error or None,
            "grants": w.grants,
            "refused": w.rejected,
            "lease_seconds": cfg.witness_lease,
        }


class RoleKeeper:
    """What this node is and what it does next (see the notes above).  The
    loop owns it: only the loop calls its methods, except that a job may
    read it (may_replicate)."""

    def __init__(self, cfg: Config, tracker: PeerTracker, report, now: float,
                 st: Optional[NodeState] = None, recovering: bool = False,
                 since_role_change: Optional[float] = None, epoch_seen: int = 0) -> None:
        self.cfg = cfg
        self.tracker = tracker     # the peer, as the heartbeats tell it
        self.report = report       # report(Note): the daemon logs, records, writes
        self.started = now
        # -- persisted in the state file (loaded from st) ---------------------
        self.role = st.role if st is not None else ROLE_SLAVE
        self.epoch = st.epoch if st is not None else 0
        self.outdated = bool(st and st.outdated)   # this replica lacks the master's data
        # (a lost verdict's mark: the GUID it held then, which is not enough)
        self.outdated_held = _guid_number(st.outdated_held if st else None)
        self.released = bool(st and st.released)   # handed the master role over: the peer may promote
        self.peer_epoch_seen = epoch_seen  # the highest epoch the peer announced or left in names
        # -- the role job -----------------------------------------------------
        self.acting = False        # a role action runs (the job "role")
        self.recovering = recovering  # an interrupted role action waits to be finished
        self._role_retry_at = 0.0  # a failed role action is retried after this
        self._role_failed = None   # type: Optional[str]  # ... of this kind
        self._role_backoff = 0.0   # seconds, doubled by each failure of one kind
        self.role_changed = (now - since_role_change if since_role_change is not None
                             else float("-inf"))   # monotonic time of the last role change
        self.promotions = 0        # role changes to master by this daemon
        self.demotions = 0         # role changes to slave by this daemon
        self.decision = None       # type: Optional[Decision]  # the newest one
        self._decision_key = None  # what was last logged of it
        self._decision_reason = None   # (kind, reason) it was made from
        self._timing = None        # (the configuration, its Timing)
        # -- the user system and the data -------------------------------------
        self.serving = False       # this daemon runs the user system now
        self.health = "unchecked" if cfg.service.check_command is None else "unknown"
        self.check_failures = 0    # consecutive failed runs of check_command
        self.repl_failures = 0     # consecutive failed replication cycles
        self.snapshot = ("", 0)    # newest own snapshot (name, GUID), as sent
        self.snapshot_guids = frozenset()  # GUIDs of all own snapshots (snapshot scan)
        self._refresh_at = 0.0     # the snapshot scan is asked for again after this
        self.last_transfer = None  # type: Optional[Tuple[float, int, float]]  # (cycle start wall time, bytes, seconds)
        self.announce_at = 0.0     # announce the service address again then (0: not)
        self.leaving = False       # a master's daemon is stopping
        # -- fencing, the arbitrator, the witness -----------------------------
        self.fenced = None         # type: Optional[bool]  # in the current silence
        self.arbitrator_seen = None  # type: Optional[float]  # start of the newest probe that got an answer
        self.arbitrator_last = None  # type: Optional[Tuple[bool, str, float]]
        self.arbitrator_lost = None  # type: Optional[float]  # newest probe without answer
        self.witness = WitnessWatch(cfg, report)
        # -- the operator's requests ------------------------------------------
        self.force = False         # an operator forces a takeover
        self.force_peer_alive = False  # ... even though the peer is heard
        self.switchover_until = 0.0  # slave: asking the master to hand over until then
        self.operator_handover = False  # master: 'demote' asked for a switchover
        self.switchover_error = None  # type: Optional[str]
        # -- a divergence -----------------------------------------------------
        self.resolving = False     # a divergence is being resolved (flag to the peer)
        self.unresolved = None     # type: Optional[str]  # why an operator must decide
        self.winner_choice = None  # type: Optional[str]  # 'resolve --winner NAME'
        self._joined = False       # took part in the peer's current attempt

    def _say(self, level: Optional[int], message: str, event=None, quiet=None) -> None:
        self.report(Note(level, message, event, None, quiet))

    def _write(self, fn) -> None:
        self.report(Note(None, "", None, fn, None))

    def _act(self, action: RoleAction) -> RoleAction:
        self.acting = True
        return action

    def reconfigured(self, cfg: Config) -> None:
        self.cfg = self.witness.cfg = cfg
        self._role_retry_at = 0.0   # e.g. a fixed divergence_policy: look again now

    # -- what the heartbeats carry --------------------------------------------

    def flags(self, now: float) -> int:
        f = 0
        if self.serving:
            f |= FLAG_SERVING
        if self.released and self.role == ROLE_SLAVE:
            f |= FLAG_RELEASE
        if self.role == ROLE_SLAVE and now < self.switchover_until:
            f |= FLAG_HANDOVER_REQUEST
        if self.resolving:
            f |= FLAG_RESOLVING
        if self.role == ROLE_MASTER and (self.leaving or
                                         self.repl_failures >= OUTDATED_AFTER_FAILURES):
            f |= FLAG_PEER_OUTDATED
        return f

    def observe_peer(self, now: float) -> bool:
        """What the peer's newest heartbeat tells beyond liveness; True when
        the newest own snapshot is to be read again now (the snapshot scan)."""
        t = self.tracker
        hb = t.last
        if t.state == "alive":
            self.fenced = None      # a new silence needs a new fence
        if t.generation_dropped is not None:
            old, new = t.generation_dropped
            t.generation_dropped = None
            message = ("%s answers with boot generation %d, below the %d it had: it restarted "
                       "from older state (a restored state file, a reverted VM snapshot); "
                       "accepted, since it answers this boot's heartbeats"
                       % (self.cfg.peer.name, new, old))
            self._say(logging.WARNING, message, ("liveness", message, "warning"))
        if t.claim is not None:   # epochs only grow: an authentic one is never unseen
            self.peer_epoch_seen = max(self.peer_epoch_seen, t.claim.epoch)
        if hb is None:
            return False
        self.peer_epoch_seen = max(self.peer_epoch_seen, hb.epoch)
        if (self.unresolved is not None and t.state == "alive" and hb.role == ROLE_SLAVE
                and not hb.flags & FLAG_RESOLVING and not self.acting):
            # the peer gave way (e.g. an operator chose this side there);
            # should the two still differ, replication finds it again
            self._say(logging.INFO, "the split brain is over: %s is slave" % self.cfg.peer.name,
                      ("split-brain", "over: %s is slave" % self.cfg.peer.name, "info"))
            self.unresolved = None
            self._role_retry_at = 0.0
        self._released_until_taken(hb)
        if self.role != ROLE_SLAVE or t.state != "alive":
            return False
        scan = False
        handed_over = hb.role != ROLE_MASTER and bool(hb.flags & FLAG_RELEASE)
        if (hb.role == ROLE_MASTER or handed_over) and hb.guid and \
                hb.guid != self.snapshot[1] and now >= self._refresh_at:
            # our newest snapshot may have arrived: once a second while the
            # master serves; every interval once it handed over, since the
            # takeover waits for exactly that (the final snapshot)
            self._refresh_at = now + (self.cfg.heartbeat_interval if handed_over else 1.0)
            scan = True
        if hb.role == ROLE_MASTER:
            behind = bool(hb.flags & FLAG_PEER_OUTDATED)
            if behind and not self.outdated:
                self._set_outdated(True, "master %s (epoch %d) says this node lacks data it "
                                         "wrote" % (self.cfg.peer.name, hb.epoch))
            elif self.outdated and not behind and hb.guid and hb.guid == self.snapshot[1] \
                    and hb.guid != self.outdated_held:
                self._set_outdated(False, "this node holds master %s's newest snapshot %s"
                                   % (self.cfg.peer.name, hb.snapshot))
        return scan

    def _set_outdated(self, value: bool, reason: str) -> None:
        self.outdated = value
        self.outdated_held = None
        self._say(logging.WARNING if value else logging.INFO, "replica %s: %s" % (
            "OUTDATED" if value else "up to date again", reason))
        self._write(lambda store: store.set_outdated(value, reason))

    def _released_until_taken(self, hb: Heartbeat) -> None:
        """The release is announced until the peer has taken over."""
        if self.released and hb.role == ROLE_MASTER and hb.epoch > self.epoch:
            self.released = False
            why = "%s took over (epoch %d)" % (self.cfg.peer.name, hb.epoch)
            self._write(lambda store: store.set_released(False, why))

    # -- deciding -------------------------------------------------------------

    def timing(self) -> Timing:
        """The timings decide() takes, from the configuration (made once
        per configuration: the loop asks at every liveness tick)."""
        c = self.cfg
        if self._timing is None or self._timing[0] is not c:
            self._timing = (c, Timing(
                dead_time=c.dead_time, startup_wait=c.startup_wait,
                wait_for_peer=c.wait_for_peer,
                isolation_time=isolation_time(c.dead_time, c.heartbeat_interval),
                check_failures=c.service.check_failures, hold_down=c.service.hold_down,
                witness_lead=witness_lead(c.witness_lease)))
        return self._timing[1]

    def facts(self, now: float) -> Facts:
        t = self.tracker
        hb = t.last
        heard = t.last_seen
        basis = heard if heard is not None and heard >= t.awake_since else t.awake_since
        cfg = self.cfg
        arbitrator = None
        if cfg.arbitrator is not None or cfg.arbitrator_command is not None:
            # it answers, and it answered since the peer went silent: this
            # node is not the isolated one.  A slave also needs it to have answered every
            # check for dead_time: one that was cut off itself and just got
            # its network back must hear its peer before it may conclude.
            last = self.arbitrator_last
            arbitrator = (last is not None and last[0] and self.arbitrator_seen is not None and
                          self.arbitrator_seen >= (heard if heard is not None else t.start))
            if self.role == ROLE_SLAVE and self.arbitrator_lost is not None:
                arbitrator = arbitrator and now - self.arbitrator_lost >= cfg.dead_time
        own_guid = self.snapshot[1]
        witness, witness_other = self.witness.facts(self.role, self.force, t.stalls, now)
        return Facts(
            role=self.role, epoch=self.epoch,
            index=cfg.local_index,
            serving=self.serving,
            outdated=self.outdated or (self.role == ROLE_SLAVE and not own_guid),
            uptime=now - self.started,
            peer_heard=heard is not None,
            peer_silence=now - basis,
            peer_role=hb.role if hb else None,
            peer_epoch=hb.epoch if hb else None,
            highest_epoch_seen=max(self.epoch, self.peer_epoch_seen),
            arbitrator=arbitrator,
            fence=None if cfg.service.fence_command is None else bool(self.fenced),
            force=self.force,
            service_failures=self.check_failures,
            peer_up_to_date=bool(hb and own_guid and hb.guid == own_guid),
            since_role_change=now - self.role_changed,
            peer_serving=bool(hb and hb.flags & FLAG_SERVING),
            peer_released=bool(hb and hb.flags & FLAG_RELEASE),
            holds_peer_newest=bool(hb and hb.guid and hb.guid == own_guid),
            released=self.released,
            peer_requests_handover=bool(hb and hb.flags & FLAG_HANDOVER_REQUEST and
                                        hb.role == ROLE_SLAVE),
            operator_handover=self.operator_handover,
            force_peer_alive=self.force_peer_alive,
            peer_claim_epoch=self._peer_claim_epoch(now),
            has_peer_newest=bool(hb and hb.guid and (hb.guid == own_guid or
                                                     hb.guid in self.snapshot_guids)),
            witness=witness, witness_other=witness_other)

    def _peer_claim_epoch(self, now: float) -> Optional[int]:
        # two intervals: a link that just healed has confirmed both ways by
        # then.  For a serving master whose peer was silent (a cut healing
        # after both served) dead_time: under load the first round trip
        # took longer, and a master that stepped down as the link healed
        # lost the verdict by rule 1 whatever divergence_policy said.  The
        # slave's and the starting master's guards (never take over) keep
        # two intervals: waiting longer is not the safe direction there.
        settle = 2 * self.cfg.heartbeat_interval
        if self.serving and self.role == ROLE_MASTER and self.tracker.unconfirmed_after_silence:
            settle = max(settle, self.cfg.dead_time)
        claim = self.tracker.one_way_claim(now, settle)
        if claim is None or claim.role != ROLE_MASTER or not claim.flags & FLAG_SERVING:
            return None
        return claim.epoch

    def next_action(self, now: float) -> Optional[RoleAction]:
        """The role action to run now, if any (the loop asks at every
        liveness tick; none while one runs)."""
        if self.acting:
            return None
        if self.recovering:
            # an action a crash or a failure cut short is finished first,
            # after the backoff of whatever failed last
            if now >= self._role_retry_at:
                return self._act(RoleAction(ROLE_RECOVER))
            return None
        hb = self.tracker.last
        if not (self.tracker.state == "alive" and hb is not None and hb.flags & FLAG_RESOLVING):
            self._joined = False
        elif not self._joined:
            # the peer began an attempt we took no part in: join in at once,
            # also while waiting for an operator (it may carry one's choice);
            # after a failed attempt of our own, once its backoff is over
            if self.unresolved is None and self._backing_off(DECIDE_RESOLVE, now):
                return None
            return self.resolution("%s is resolving a divergence" % self.cfg.peer.name, now,
                                   join=True)
        else:
            return None    # our part is done: the peer is still carrying out its own
        d = decide(self.facts(now), self.timing())
        self.decision = d
        if (d.kind, d.reason) != self._decision_reason:   # (the regex: not every tick)
            self._decision_reason = (d.kind, d.reason)
            key = (d.kind, re.sub(r"[0-9.]+ s\b", "", d.reason))
        else:
            key = self._decision_key
        if key != self._decision_key:
            self._decision_key = key
            split = d.kind == DECIDE_SPLIT_BRAIN
            self._say(logging.ERROR if split else logging.INFO,
                      "decision: %s: %s" % (d.kind, d.reason),
                      ("split-brain", d.reason + "; the divergence verdict decides which "
                       "node's data continues", "error") if split else None)
        resolve = d.kind == DECIDE_SPLIT_BRAIN or (d.kind == DECIDE_DEMOTE and not self.serving)
        if self._backing_off(DECIDE_RESOLVE if resolve else d.kind, now):
            return None
        if resolve:
            # two masters, or a former master meeting a newer one: whose
            # data continues is the divergence verdict's to say
            return self.resolution(d.reason, now)
        if d.kind == DECIDE_PROMOTE:
            dead = self.tracker.state == "dead"
            return self._act(RoleAction(d.kind, d.reason, d.epoch, decided=now,
                                        deadline=self.tracker.dead_since if dead else None))
        if d.kind == DECIDE_STEP_DOWN:
            return self._act(RoleAction(d.kind, d.reason, max(self.epoch, self.peer_epoch_seen),
                                        decided=now))
        if d.kind in (DECIDE_RESUME, DECIDE_HANDOVER, DECIDE_FENCE):
            return self._act(RoleAction(d.kind, d.reason, self.epoch, decided=now))
        return None

    def _backing_off(self, kind: str, now: float) -> bool:
        """The role action `kind` failed a moment ago (or the daemon itself
        erred: kind "role"), and waits for its backoff.  Another action (the
        peer died while a resolution kept failing: promote) runs at once: a
        failed action never delays a failover."""
        return now < self._role_retry_at and self._role_failed in (kind, "role")

    def resolution(self, why: str, now: float, join: bool = False) -> Optional[RoleAction]:
        """Begin (or retry) resolving a divergence with the peer."""
        if not join and self.unresolved is not None and now < self._role_retry_at:
            return None
        serving = self.serving
        hb = self.tracker.last
        peer = self.cfg.peer.name
        yield_first = hb is not None and hb.role == ROLE_MASTER and split_brain_yields(
            self.epoch, hb.epoch, serving, bool(hb.flags & FLAG_SERVING))
        if not serving and hb is not None and hb.flags & FLAG_SERVING:
            self._say(logging.INFO, "rejoining %s, which serves: %s" % (peer, why))
        else:
            self._say(logging.WARNING, "resolving a divergence with %s: %s%s" % (
                peer, why, "; %s serves in a newer epoch: stopping the user system first"
                % peer if yield_first else ""))
        self.resolving = True
        self._joined = True    # this attempt answers one the peer may have begun
        return self._act(RoleAction(DECIDE_RESOLVE, why, self.epoch, serving=serving,
                                    yield_first=yield_first, winner=self.winner_choice))

    def stopped_serving(self) -> None:
        """The user system was stopped (by a role job, or at exit)."""
        self.serving = False

    def role_done(self, result, error, now: float) -> None:
        """The outcome of the job "role": (node state, failure, kind, the
        action a recovery finished or None, whether an action is still
        unfinished), or the internal error that ended it."""
        self.acting = False
        if error is not None:     # an internal error: logged, retried later
            result = (None, error, "role", None, self.recovering)
        st, failure, kind, recovered, self.recovering = result
        if kind == DECIDE_FENCE and failure is None:
            self.fenced = True
        if st is not None:
            self._adopt(st, failure, kind, recovered, now)
        self.resolving = False     # only a resolution sets it; any role job ends it
        if kind == DECIDE_RESOLVE:
            if failure is None:
                self.unresolved = None
                self.winner_choice = None
            elif not isinstance(failure, NeedsOperator):
                self._joined = False   # take part again in an attempt the peer still runs
            if isinstance(failure, NeedsOperator):
                self.unresolved = failure.message
                self._role_failed = DECIDE_RESOLVE
                self._role_retry_at = now + UNRESOLVED_RETRY
                self._say(logging.ERROR, "SPLIT BRAIN, an operator must decide: %s"
                          % failure.message, quiet=("unresolved", 300))
                return
        if failure is None:
            self._role_backoff = 0.0
            self._role_failed = None
            if kind != DECIDE_FENCE:
                self._say(logging.INFO, "%s done: role %s, epoch %d, %s" % (
                    kind, self.role, self.epoch, "serving" if self.serving else "not serving"))
            return
        if isinstance(failure, HandoverAborted):
            self.operator_handover = False
            self.switchover_error = failure.message
            self._say(logging.ERROR, failure.message, ("handover", failure.message, "error"))
            return
        if kind != self._role_failed:
            self._role_backoff = 0.0     # another action: its own backoff
        self._role_failed = kind
        self._role_backoff = min(60.0, max(1.0, self._role_backoff * 2))
        self._role_retry_at = now + self._role_backoff
        why = failure.message if isinstance(failure, FlockerError) else repr(failure)
        self._say(logging.ERROR, "%s failed: %s (next try in %g s)" % (
            kind, why, self._role_backoff), ("role", "%s failed: %s" % (kind, why), "error"))

    def _adopt(self, st: NodeState, failure, kind: str, recovered, now: float) -> None:
        """The node state a role job left: role, epoch, release, serving."""
        self.released = st.released
        if (st.role, st.epoch) != (self.role, self.epoch):
            self.role_changed = now
        if st.role != self.role:
            if st.role == ROLE_MASTER:
                self.promotions += 1
            else:
                self.demotions += 1
        was = self.role
        self.role, self.epoch = st.role, st.epoch
        if st.role == ROLE_SLAVE:
            self.serving = False
        elif isinstance(failure, HandoverAborted):
            self.serving = failure.resumed   # a switchover called off
        elif failure is None and (kind in SERVING_KINDS or recovered == "promote"):
            # a promotion, a resumption, a won resolution, a recovered
            # promotion: only these leave the user system running
            self.serving = True
            if self.cfg.service.announce_again:   # for neighbours that missed it
                self.announce_at = now + self.cfg.service.announce_again
        if st.role != was:
            self.operator_handover = False
            self.switchover_until = 0.0
        if was == ROLE_MASTER and st.role == ROLE_SLAVE:
            # a lease held as master is no slave's ticket to promote: a
            # node that stepped down (isolated, or hearing a newer
            # master) must be granted one anew after its peer fell silent
            self.witness.view.lost(now)
        if st.role == ROLE_MASTER and was != ROLE_MASTER:
            self.fenced, self.check_failures, self.repl_failures = None, 0, 0
            self.force = self.force_peer_alive = False
        if st.role == ROLE_MASTER and self.outdated:
            self._set_outdated(False, "this node is master now")
        elif st.role == ROLE_SLAVE and st.outdated and not self.outdated:
            # a lost verdict marked it (_outdated_by): the winner wrote what
            # this node lacks
            self.outdated, self.outdated_held = True, _guid_number(st.outdated_held)
            self._say(logging.WARNING, "replica OUTDATED: %s won the divergence verdict and "
                      "wrote data this node lacks; no automatic takeover until this node "
                      "holds its newest snapshot" % self.cfg.peer.name)

    # -- what the jobs found --------------------------------------------------

    def may_replicate(self) -> bool:
        """(Read by the replication job when it starts.)  Only while this
        node serves as master, changes no role, and only to a live slave
        that is not resolving a divergence."""
        hb = self.tracker.last
        return not (self.role != ROLE_MASTER or not self.serving or self.acting
                    or self.unresolved is not None or self.resolving
                    or self.tracker.state != "alive" or hb is None or hb.role != ROLE_SLAVE
                    or hb.flags & FLAG_RESOLVING)

    def replicated(self, outcome, error, now: float) -> Optional[RoleAction]:
        """The replication job's outcome: (cycle start wall time, result),
        or None when it did not run; a divergence it found is resolved."""
        if isinstance(error, DivergenceError) and not self.acting:
            self.repl_failures += 1
            return self.resolution("replication: %s" % error.message, now)
        if error is not None:
            self.repl_failures += 1
            text = error.message if isinstance(error, FlockerError) else repr(error)
            # the same error once a minute; a different one at once
            self._say(logging.WARNING, "replication: %s" % text,
                      quiet=("replicate " + re.sub(r"[0-9]+", "", text)[:200], 60.0))
        elif outcome is not None:
            started, result = outcome
            self.repl_failures = 0
            self.last_transfer = (started, result.bytes, result.seconds)
            self.snapshot = (result.snapshot[:255], _guid_number(result.guid))
            if result.sent:
                self._say(logging.INFO, "replication: %s" % result.message)
        return None

    def snapshots_scanned(self, result, error) -> None:
        """The snapshot scan's outcome: (newest (name, GUID), all GUIDs)."""
        if error is not None:
            self._say(logging.WARNING, "cannot read the newest snapshot: %s" % error,
                      quiet=("snapshots", 60.0))
            return
        self.snapshot, self.snapshot_guids = result

    def checked(self, result, error) -> None:
        """check_command's outcome (a CommandResult; None: not run)."""
        if error is not None:
            self.health = "unknown"
            self._say(logging.ERROR, "check_command failed to run: %s" % error,
                      quiet=("check", 60.0))
            return
        if result is None:
            self.health = "unchecked"
            self.check_failures = 0
            return
        status, tail = result.returncode, result.tail
        old, self.health = self.health, ("ok" if status == 0 else "failed")
        self.check_failures = 0 if status == 0 else self.check_failures + 1
        if status is None:
            self._say(logging.ERROR, "check_command did not finish within %g s "
                      "(command_timeout) and was killed: %s"
                      % (self.cfg.service.command_timeout, tail), quiet=("check", 60.0))
        elif status != 0 and old != "failed":
            self._say(logging.WARNING, "check_command exited %d: %s" % (status, tail))
        if old != self.health and old not in ("unchecked", "unknown"):
            self._say(None, "", ("health", "service health %s -> %s" % (old, self.health),
                                 "info"))

    def arbitrator_answered(self, result, error, now: float) -> None:
        """The arbitrator probe's outcome: (reachable, how, probe start)."""
        if error is not None or result is None:
            if error is not None:
                self._say(logging.ERROR, "cannot check the arbitrator: %s" % error,
                          quiet=("arbitrator", 60.0))
            return
        reachable, how, started = result
        if self.arbitrator_last is None or self.arbitrator_last[0] != reachable:
            what = self.cfg.arbitrator_command and "arbitrator_command" or \
                "arbitrator %s:%d" % self.cfg.arbitrator
            message = "%s is %s: %s" % (what, "reachable" if reachable else "NOT reachable", how)
            self._say(logging.INFO if reachable else logging.WARNING, message,
                      ("arbitrator", message, "info" if reachable else "warning"))
        self.arbitrator_last = result
        if reachable:
            self.arbitrator_seen = max(self.arbitrator_seen or started, started)
        else:
            self.arbitrator_lost = now

    # -- the operator's requests (from the control socket) --------------------

    def operator_switchover(self, cmd: str, req: dict, now: float) -> dict:
        """'promote' on the slave, 'demote' on the master (see the CLI)."""
        alive = self.tracker.state == "alive"
        peer = self.cfg.peer.name
        busy = self.acting
        if cmd == "demote":
            if self.role != ROLE_MASTER or not self.serving:
                return {"ok": False, "error": "this node is not the serving master (role %s); "
                        "run 'demote' on the master" % self.role}
            if not alive:
                return {"ok": False, "error": "the peer %s is not alive: a switchover needs a "
                        "slave to take over; nothing was changed (stopping the daemon "
                        "stops the service)" % peer}
            self.operator_handover = True
            self.switchover_error = None
            self._say(logging.INFO, "operator: demote (planned switchover to %s)" % peer,
                      ("operator", "demote requested: planned switchover to %s" % peer, "info"))
            return {"ok": True, "busy": busy}
        if self.role == ROLE_MASTER:
            return {"ok": False, "error": "this node is already master (epoch %d)" % self.epoch}
        if req.get("force"):
            if alive and not req.get("peer_alive_ok"):
                return {"ok": False, "error": "the peer %s is alive (heard %.1f s ago): a "
                        "forced takeover now makes two masters. Use 'promote' without "
                        "--force for a planned switchover; if you are sure, add "
                        "--i-know-the-peer-is-alive" % (
                            peer, now - (self.tracker.last_seen or now))}
            self.force = True
            self.force_peer_alive = alive
            self._say(logging.WARNING, "operator: promote --force%s" % (
                " (the peer is alive)" if alive else ""), ("operator", "promote --force "
                "requested%s" % (" although the peer is alive" if alive else ""), "warning"))
            return {"ok": True, "busy": busy}
        if not alive or (self.tracker.last and self.tracker.last.role != ROLE_MASTER):
            return {"ok": False, "error": "the peer %s is %s: a planned switchover needs a "
                    "serving master; if it is dead, 'promote --force' takes over"
                    % (peer, "not alive" if not alive else "not master")}
        self.switchover_until = now + SWITCHOVER_TIMEOUT + 2 * self.cfg.service.command_timeout
        self.switchover_error = None
        self._say(logging.INFO, "operator: promote (asking %s for a planned switchover)" % peer,
                  ("operator", "promote requested: asking %s to hand over" % peer, "info"))
        return {"ok": True, "busy": busy}

    def operator_resolve(self, winner) -> dict:
        """'resolve --winner NODE': the operator's choice for the divergence."""
        if winner not in [n.name for n in self.cfg.nodes]:
            return {"ok": False, "error": "--winner must name a node: %s or %s"
                    % (self.cfg.local_name, self.cfg.peer.name)}
        self.winner_choice = winner
        self._role_retry_at = 0.0
        self._say(logging.WARNING, "operator: resolve --winner %s" % winner,
                  ("operator", "resolve --winner %s" % winner, "warning"))
        return {"ok": True}

    def operator_announce(self, now: float) -> dict:
        """'announce': the service address again, now."""
        if not self.serving or self.cfg.service.service_address is None:
            return {"ok": False, "error": "this node does not serve the service address "
                    "(%s); only the serving master announces it"
                    % (self.cfg.service.service_address or "none is configured")}
        self.announce_at = now
        return {"ok": True}

    def status(self, now: float) -> dict:
        """The keeper's part of the daemon's live status."""
        age = lambda m: None if m is None else round(now - m, 3)  # noqa: E731
        return {
            "role": self.role, "epoch": self.epoch, "health": self.health,
            "serving": self.serving, "outdated": self.outdated,
            "decision": None if self.decision is None else
            {"kind": self.decision.kind, "reason": self.decision.reason},
            "arbitrator": None if self.arbitrator_last is None else
            {"reachable": self.arbitrator_last[0], "how": self.arbitrator_last[1],
             "age_seconds": age(self.arbitrator_last[2])},
            "witness": self.witness.status(now),
            "fenced": self.fenced, "check_failures": self.check_failures,
            "replication_failures": self.repl_failures, "released": self.released,
            "recovering": self.recovering,
            "promotions": self.promotions, "demotions": self.demotions,
            "divergence": {"resolving": self.resolving, "unresolved": self.unresolved,
                           "winner_choice": self.winner_choice},
            "last_transfer": None if self.last_transfer is None else
            {"started": self.last_transfer[0], "bytes": self.last_transfer[1],
             "seconds": self.last_transfer[2]},
            "switchover": {"requested": self.operator_handover or
                           now < self.switchover_until,
                           "force": self.force, "error": self.switchover_error},
            "snapshot": self.snapshot[0] or None,
        }


class JobRunner:
    """Runs slow work off the event loop.  start(name, fn, on_done) runs
    fn(stop) in the worker thread of that name (stop: a threading.Event set
    when the daemon stops; long work should check it and abort cleanly); at
    most one job of a name runs at a time.  on_done(result, error) runs
    later on the loop, from collect(), which the loop calls when `wake`
    told it to.

    Each name has one long-lived worker, made the first time: starting a
    job only hands it over (a queue put), so the loop never waits for a new
    thread to be scheduled, which on a busy host took long enough to delay
    heartbeats."""

    class _Job:
        def __init__(self, name, fn, on_done):
            self.name, self.fn, self.on_done = name, fn, on_done
            self.stop = threading.Event()
            self.done = threading.Event()
            self.started = time.monotonic()
            self.result = self.error = None

    def __init__(self, wake) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._running = {}   # type: Dict[str, JobRunner._Job]
        self._done = []      # type: List[JobRunner._Job]
        self._workers = {}   # type: Dict[str, queue.Queue]
        self._calls = []     # type: List[object]  # call_soon()'s, for the loop

    def start(self, name: str, fn, on_done=None) -> bool:
        if name in self._running:
            return False
        job = self._Job(name, fn, on_done)
        self._running[name] = job
        q = self._workers.get(name)
        if q is None:
            q = self._workers[name] = queue.Queue()
            threading.Thread(target=self._worker, args=(q,), name="job-" + name,
                             daemon=True).start()
        q.put(job)
        return True

    def _worker(self, q: "queue.Queue") -> None:
        with contextlib.suppress(OSError, AttributeError):   # never real-time (see Daemon)
            if os.sched_getscheduler(0) != os.SCHED_OTHER:
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        while True:
            job = q.get()
            if job is None:
                return
            try:
                job.result = job.fn(job.stop)
            except BaseException as e:  # delivered to on_done on the loop
                job.error = e
            with self._lock:
                self._done.append(job)
            job.done.set()
            self._wake()

    def call_soon(self, fn) -> None:
        """From a job's thread: run fn() on the loop soon (before the
        on_done of any job that ends after this call), for what the loop
        must know before the job ends."""
        with self._lock:
            self._calls.append(fn)
        self._wake()

    def busy(self, name: str) -> bool:
        return name in self._running

    def cancel(self, name: str, timeout: float) -> bool:
        """Ask job `name` to stop and wait for it to end (from another job's
        thread: never from the loop).  True when it is not running."""
        job = self._running.get(name)
        if job is None:
            return True
        job.stop.set()
        return job.done.wait(timeout)

    def wait(self, name: str, timeout: float) -> bool:
        """Wait up to timeout for job `name` to end by itself (from another
        job's thread: never from the loop).  True when it is not running."""
        job = self._running.get(name)
        return job is None or job.done.wait(timeout)

    def collect(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
            done, self._done = self._done, []
        for fn in calls:
            try:
                fn()
            except Exception:
                log.exception("internal error in a call from a job")
        for job in done:
            self._running.pop(job.name, None)
            if job.on_done is not None:
                try:
                    job.on_done(job.result, job.error)
                except Exception:
                    log.exception("internal error after job %s", job.name)
            elif job.error is not None:
                log.error("job %s failed: %s", job.name, job.error)

    def running(self) -> Dict[str, float]:
        now = time.monotonic()
        return {n: round(now - j.started, 3) for n, j in self._running.items()}

    def stop_all(self, timeout: float) -> List[str]:
        """Ask every job to stop and wait for them; returns those still
        running.  The workers end (they are daemon threads: one still busy
        is abandoned at exit)."""
        jobs = list(self._running.values())
        for job in jobs:
            job.stop.set()
        for q in self._workers.values():
            q.put(None)
        deadline = time.monotonic() + timeout
        for job in jobs:
            job.done.wait(max(0.0, deadline - time.monotonic()))
        self.collect()
        return [j.name for j in jobs if not j.done.is_set()]


class _BorrowedLock:
    """The daemon's state lock lent to a second connection: closing that
    connection must not release it."""

    def __init__(self, lock: StateLock) -> None:
        self.fd = lock.fd
        self.path = lock.path

    def release(self) -> None:
        pass


class StoreWriter:
    """One thread that owns the daemon's sqlite connection; submit(fn)
    queues fn(store) and returns at once.  A role job that must write
    after what is queued (the events that led to it) writes the queue
    itself, on its own connection (write_pending): it waits for no other
    thread to be scheduled, only for the one write the writer may be in."""

    MAX_PENDING = 1000

    def __init__(self, path: str, lock: StateLock) -> None:
        self.path = path
        self.lock = lock
        self._pending = collections.deque()   # type: collections.deque
        self._cond = threading.Condition()
        self._busy = False         # a write runs (the writer's, or write_pending's)
        self._closing = False
        self.thread = threading.Thread(target=self._run, name="state", daemon=True)
        self.dropped = 0

    def start(self) -> None:
        self.thread.start()

    def submit(self, fn) -> None:
        with self._cond:
            if len(self._pending) >= self.MAX_PENDING:
                self.dropped += 1
                return
            self._pending.append(fn)
            self._cond.notify_all()

    def _apply(self, store: Optional[StateStore], fns) -> None:
        for fn in fns:
            if store is None:
                continue
            try:
                fn(store)
            except (sqlite3.Error, FlockerError) as e:
                log.error("could not write to the state file %s: %s", self.path, e)

    def _take(self, everything: bool, timeout: Optional[float] = None):
        """The next write(s) to make, once no other runs (marked busy);
        None when closing with nothing left (or not within timeout)."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._busy and (
                    self._pending or self._closing or everything), timeout):
                return None
            if not self._pending and not everything:
                return None
            fns = list(self._pending) if everything else [self._pending.popleft()]
            if everything:
                self._pending.clear()
            self._busy = True
            return fns

    def _done(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def _run(self) -> None:
        store = None
        try:
            store = StateStore.open(self.path, lock=_BorrowedLock(self.lock))
        except FlockerError as e:
            log.error("cannot write the state file: %s", e.message)
        while True:
            fns = self._take(everything=False)
            if fns is None:
                break
            try:
                self._apply(store, fns)
            finally:
                self._done()
        if store is not None:
            store.close()

    def write_pending(self, store: StateStore, timeout: float) -> bool:
        """From another thread, with its own connection: write everything
        queued so far, in order, there and now, so that what it writes next
        comes after.  False when a write of the writer's did not end within
        timeout (nothing was taken then)."""
        fns = self._take(everything=True, timeout=timeout)
        if fns is None:
            return False
        try:
            self._apply(store, fns)
        finally:
            self._done()
        return True

    def close(self, timeout: float = 10.0) -> bool:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self.thread.join(timeout)
        return not self.thread.is_alive()


class _Timer:
    def __init__(self, name: str, period, fn, due: float, lax: float = 0.0) -> None:
        self.name = name
        self.period = period   # callable -> seconds (the config may change)
        self.fn = fn           # fn(now)
        self.due = due
        # seconds it may run late, to run in a wakeup the loop makes anyway
        # instead of one of its own (an idle daemon's wakeups are its idle
        # cost); 0: on time
        self.lax = lax


_DUE = operator.attrgetter("due")


def run_timers(timers: List[_Timer], now: float, leader: _Timer, follower: _Timer
               ) -> Tuple[Optional[float], float]:
    """Run each timer due by now, the earliest first, each at most once,
    then due again one period later (missed beats are not made up in a
    burst).  The follower (the liveness tick) also runs right after the
    leader (the heartbeat), in the same wakeup: so it keeps the leader's
    step instead of waking the loop apart, and still runs at least every
    period.  Returns the last and the worst lateness (beyond its lax) of
    what ran (last: None when nothing ran)."""
    last, worst = None, 0.0
    ran = []
    while True:
        t = min((t for t in timers if t not in ran), key=_DUE, default=None)
        if t is None or t.due > now:
            return last, worst
        last = max(0.0, now - t.due - t.lax)
        worst = max(worst, last)
        t.fn(now)
        ran.append(t)
        period = t.period()
        t.due += period
        if t.due <= now:        # missed beats are not made up in a burst
            t.due = now + period
        if t is leader and follower not in ran:
            follower.due = min(follower.due, now)
        now = time.monotonic()


# -- the heartbeat link -------------------------------------------------------
#
# The heartbeat sockets (one UDP socket per own address, one per link): our
# packets out, the peer's in, into the PeerTracker.  Rejected packets are
# logged in detail at most once a minute per reason and summarised every
# REJECT_SUMMARY_EVERY seconds; the peer's newest heartbeat is persisted on
# a change and every PEER_SAVE_EVERY seconds.  It runs on the loop.

class HeartbeatLink:
    """The heartbeat sockets of one daemon (see the notes above)."""

    def __init__(self, cfg: Config, tracker: PeerTracker, keeper: RoleKeeper,
                 generation: int, report, saved_peer=None) -> None:
        self.cfg = cfg
        self.tracker = tracker
        self.keeper = keeper       # what our packets say: role, epoch, snapshot, flags
        self.report = report       # report(Note), as the keeper's
        self.generation = generation   # this boot's, in every packet
        self.sequence = 0          # of our newest packet
        self.socks = []            # type: List[socket.socket]  # one per link
        self.heartbeat = _Timer("heartbeat", lambda: self.cfg.heartbeat_interval, self.send,
                                0.0)
        self.news = lambda: None   # called when the peer's heartbeat says something new
        self._answered_at = -1e9   # when a packet was last sent out of turn
        self._reject_window = {}   # type: Dict[str, int]  # rejections since the last summary
        self._reject_sources = set()
        self._reject_detail_at = {}  # type: Dict[str, float]
        self._peer_saved = saved_peer  # the peer row as last persisted
        self._peer_saved_at = -1e9
        self._own = None           # (the configuration, our secrets, their key ids)

    def open(self, sel: selectors.BaseSelector) -> None:
        port = self.cfg.heartbeat_port
        for i, addr in enumerate(self.cfg.local.addresses):
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            s = socket.socket(family, socket.SOCK_DGRAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                s.bind((addr, port))
            except OSError as e:
                s.close()
                raise FlockerError(
                    "cannot listen for heartbeats on %s port %d: %s; check that the "
                    "address is configured on this host and no other program uses "
                    "the port ([cluster] heartbeat_port)" % (addr, port, e.strerror)) from None
            s.setblocking(False)
            self.socks.append(s)
            sel.register(s, selectors.EVENT_READ,
                         lambda sock, mask, i=i: self.on_packets(sock, i))

    def close(self) -> None:
        for s in self.socks:
            s.close()

    def timers(self, now: float) -> List[_Timer]:
        """The link's timers: heartbeats, persisting the peer, summaries."""
        self.heartbeat.due = now
        return [self.heartbeat,
                _Timer("persist", lambda: 1.0, self.persist_peer, now + 1.0, lax=0.5),
                _Timer("rejections", lambda: REJECT_SUMMARY_EVERY, self.summarise_rejections,
                       now + REJECT_SUMMARY_EVERY, lax=1.0)]

    def _own_keys(self) -> Tuple[List[bytes], Tuple[str, ...]]:
        """Our secrets and their key ids (made once per configuration, not
        per packet)."""
        cfg = self.cfg
        if self._own is None or self._own[0] is not cfg:
            own = [cfg.secret] + ([cfg.secret_previous] if cfg.secret_previous else [])
            self._own = (cfg, own, tuple(key_id(key) for key in own))
        return self._own[1], self._own[2]

    def send(self, now: float) -> None:
        """One packet on every link."""
        cfg, k = self.cfg, self.keeper
        own, ids = self._own_keys()
        last = self.tracker.last
        secret = choose_send_key(own, last.accepts if last is not None else (), ids)
        kid = ids[own.index(secret)]
        echo = self.tracker.echo()
        for i, s in enumerate(self.socks):
            lv = self.tracker.links[i]
            self.sequence += 1
            hb = Heartbeat(cluster=cfg.name, sender=cfg.local_name,
                           generation=self.generation, sequence=self.sequence,
                           role=k.role, epoch=k.epoch, snapshot=k.snapshot[0],
                           guid=k.snapshot[1], health=k.health, flags=k.flags(now),
                           echo_generation=echo[0], echo_sequence=echo[1], accepts=ids)
            try:
                s.sendto(encode_heartbeat(hb, secret, kid), (lv.peer, cfg.heartbeat_port))
                self.tracker.sent(self.sequence, time.monotonic())
                lv.sent += 1
            except OSError as e:
                lv.send_errors += 1
                self.report(Note(logging.WARNING, "cannot send heartbeats on link %d "
                                 "(%s -> %s): %s" % (i, lv.local, lv.peer, e.strerror),
                                 quiet=("send%d" % i, 60.0)))

    def on_packets(self, sock: socket.socket, link: int) -> None:
        tracker = self.tracker
        for _ in range(RECV_BATCH):
            try:
                data, addr = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:   # e.g. ICMP errors reported on the socket
                self.report(Note(logging.INFO, "link %d: %s" % (link, e.strerror),
                                 quiet=("recv%d" % link, 60.0)))
                return
            before = tracker.last
            hb, rej = tracker.receive(data, link, time.monotonic())
            if rej is not None:
                self._note_reject(rej, addr[0])
            elif hb is not None and (before is None or (hb.role, hb.epoch, hb.flags, hb.guid)
                                     != (before.role, before.epoch, before.flags, before.guid)):
                self.news()      # a new role, epoch, flag or snapshot: decide on it now
            elif hb is None or tracker.state != "alive":
                # the peer has not heard us lately, or we had not heard it:
                # answer now instead of at the next beat, so that both sides
                # confirm each other within about one interval
                self.answer_soon()

    def answer_soon(self) -> None:
        """Send the next heartbeat now (at most twice per interval)."""
        now = time.monotonic()
        if now - self._answered_at < self.cfg.heartbeat_interval / 2:
            return
        self._answered_at = now
        self.heartbeat.due = min(self.heartbeat.due, now)

    def _note_reject(self, rej: WireReject, source: str) -> None:
        reason = rej.reason
        self._reject_window[reason] = self._reject_window.get(reason, 0) + 1
        if len(self._reject_sources) < 5:
            self._reject_sources.add(source)
        now = time.monotonic()
        if now - self._reject_detail_at.get(reason, -1e9) < REJECT_DETAIL_EVERY:
            return
        self._reject_detail_at[reason] = now
        if reason in ("bad_mac", "unknown_key"):
            keys = self.tracker.keys
            self.report(Note(logging.ERROR, (
                "REJECTED a heartbeat from %s with a wrong key (%s): either the "
                "nodes do not share the same secret (this node accepts key id%s %s; "
                "compare 'config-check' on both nodes) or someone is forging "
                "packets. Further such packets are counted in 'status' and "
                "summarised every %g s" % (source, rej, "s" if len(keys) > 1 else "",
                                           ", ".join(k[0] for k in keys.values()),
                                           REJECT_SUMMARY_EVERY)),
                ("rejected", "heartbeat from %s with a wrong key: %s" % (source, rej), "error")))
        else:
            hint = ""
            if reason == "old_generation":
                hint = ("; a replay of recorded packets, or node %s restarted from older "
                        "state (its state file restored from a backup or made anew with "
                        "'init --force', a VM snapshot reverted): such a peer is accepted "
                        "as soon as it answers this node's heartbeats" % self.cfg.peer.name)
            self.report(Note(logging.WARNING, "rejected a packet from %s: %s%s (further ones "
                             "are counted and summarised every %g s)"
                             % (source, rej, hint, REJECT_SUMMARY_EVERY)))

    def summarise_rejections(self, now: float) -> None:
        if not self._reject_window:
            return
        text = ", ".join("%s %d" % kv for kv in sorted(self._reject_window.items()))
        self.report(Note(logging.WARNING, "rejected in the last %g s: %s (from %s)" % (
            REJECT_SUMMARY_EVERY, text, ", ".join(sorted(self._reject_sources)))))
        self._reject_window = {}
        self._reject_sources = set()

    def persist_peer(self, now: float, force: bool = False) -> None:
        """The peer's newest heartbeat to the state file: not once per
        packet, but on a change (looked at every second) and else every
        PEER_SAVE_EVERY seconds; `force`: now (at exit)."""
        t = self.tracker
        hb = t.last
        if hb is None:
            return
        key = (hb.role, hb.epoch, hb.generation, hb.snapshot or None,
               str(hb.guid) if hb.guid else None, hb.health)
        if not force and key == self._peer_saved and (
                now - self._peer_saved_at < PEER_SAVE_EVERY or t.last_seen <= self._peer_saved_at):
            return
        self._peer_saved, self._peer_saved_at = key, now
        seen = wall_clock() - (now - t.last_seen)
        name = self.cfg.peer.name
        self.report(Note(None, "", write=lambda store: store.save_peer(name, seen, *key)))

    def announce_leaving(self) -> None:
        """Tell the slave that it lacks what was written since the last
        replication, until it echoes one of these packets (then it holds
        the flag and will not take over by itself), for at most dead_time.
        A peer that is not heard now gets three packets, 50 ms apart."""
        first = self.sequence + 1
        heard = self.tracker.state == "alive"
        deadline = time.monotonic() + (self.cfg.dead_time if heard else 0.1)
        with selectors.DefaultSelector() as sel:   # the heartbeat sockets only
            for i, sock in enumerate(self.socks):
                sel.register(sock, selectors.EVENT_READ, i)
            while True:
                self.send(time.monotonic())
                until = min(deadline, time.monotonic() + (
                    min(self.cfg.heartbeat_interval, 0.2) if heard else 0.05))
                while time.monotonic() < until:
                    for key, _ in sel.select(max(0.0, until - time.monotonic())):
                        self.on_packets(key.fileobj, key.data)
                    hb = self.tracker.last
                    if (hb is not None and hb.echo_generation == self.generation
                            and hb.echo_sequence >= first):
                        self.report(Note(logging.INFO, "%s heard that this daemon is "
                                         "stopping" % self.cfg.peer.name))
                        return
                if time.monotonic() >= deadline:
                    if heard:
                        self.report(Note(logging.WARNING, "%s did not confirm within %g s "
                                         "that it heard this daemon is stopping"
                                         % (self.cfg.peer.name, self.cfg.dead_time)))
                    return

    def status(self, now: float) -> dict:
        """The link's part of the daemon's live status."""
        t = self.tracker
        age = lambda m: None if m is None else round(now - m, 3)  # noqa: E731
        hb = t.last
        peer = {"node": self.cfg.peer.name, "state": t.state,
                "state_age_seconds": age(t.state_since),
                "last_seen_age_seconds": age(t.last_seen),
                "dead_verdicts": t.dead_verdicts,
                "silence_at_last_verdict_seconds":
                    None if t.silence_at_verdict is None else round(t.silence_at_verdict, 3)}
        if hb is not None:
            peer.update(role=hb.role, epoch=hb.epoch, generation=hb.generation,
                        sequence=hb.sequence, snapshot=hb.snapshot or None,
                        guid=str(hb.guid) if hb.guid else None, health=hb.health,
                        flags=hb.flags, key_id=hb.key_id)
        return {
            "generation": self.generation,
            "key_ids": [k[0] for k in t.keys.values()],
            "peer": peer,
            "links": [{"index": lv.index, "local": lv.local, "peer": lv.peer,
                       "state": lv.state, "last_seen_age_seconds": age(lv.last_seen),
                       "received": lv.received, "sent": lv.sent,
                       "send_errors": lv.send_errors,
                       "max_gap_seconds": round(lv.max_gap, 4)} for lv in t.links],
            "rejected": dict(t.rejected),
            "unconfirmed": t.unconfirmed,
            "stalls": t.stalls,
        }


# -- the control server -------------------------------------------------------
#
# The control socket (see the notes at the top of this section): one JSON
# request per connection, answered by handlers[cmd](request) on the loop.

class _ControlClient:
    def __init__(self, conn: socket.socket, deadline: float) -> None:
        self.conn = conn
        self.deadline = deadline
        self.inbuf = b""
        self.outbuf = b""


class ControlServer:
    """The control socket; `handlers` maps each command to fn(request) ->
    reply (in the order the unknown-command error lists them)."""

    def __init__(self, path: str, sel: selectors.BaseSelector, handlers) -> None:
        self.path = path
        self.sel = sel
        self.handlers = handlers
        self.sock = None           # type: Optional[socket.socket]
        self.clients = {}          # type: Dict[int, _ControlClient]

    def open(self) -> None:
        path = self.path
        directory = os.path.dirname(path)
        if len(path.encode()) > 100:
            raise FlockerError("the control socket path %s is too long for a unix "
                               "socket; set state_db to a shorter path" % path)
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise FlockerError("cannot create the control directory %s: %s"
                               % (directory, e.strerror)) from None
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise FlockerError("%s is not a directory owned by this user; remove it so "
                               "that the daemon can make its private control directory"
                               % directory)
        os.chmod(directory, 0o700)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)   # a dead daemon's socket: we hold the state lock
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        s.listen(16)
        s.setblocking(False)
        self.sock = s
        self.sel.register(s, selectors.EVENT_READ, self._on_accept)

    def close(self) -> None:
        for cl in list(self.clients.values()):
            self._drop(cl)
        if self.sock is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.sock.close()

    def _on_accept(self, sock, mask) -> None:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            uid = struct.unpack("3i", creds)[1]
        except OSError:
            uid = -1
        if len(self.clients) >= CONTROL_MAX_CLIENTS or uid not in (0, os.geteuid()):
            conn.close()
            return
        conn.setblocking(False)
        client = _ControlClient(conn, time.monotonic() + CONTROL_TIMEOUT)
        self.clients[conn.fileno()] = client
        self.sel.register(conn, selectors.EVENT_READ,
                          lambda s, m, cl=client: self._on_io(cl, m))

    def _on_io(self, cl: _ControlClient, mask) -> None:
        try:
            if mask & selectors.EVENT_READ:
                data = cl.conn.recv(CONTROL_MAX_REQUEST)
                if not data:
                    return self._drop(cl)
                cl.inbuf += data
                if b"\n" in cl.inbuf:
                    line = cl.inbuf.split(b"\n", 1)[0]
                    reply = self.request(line)
                    cl.outbuf = (json.dumps(reply, sort_keys=True) + "\n").encode()
                    self.sel.modify(cl.conn, selectors.EVENT_WRITE,
                                    lambda s, m, cl=cl: self._on_io(cl, m))
                elif len(cl.inbuf) > CONTROL_MAX_REQUEST:
                    return self._drop(cl)
            if mask & selectors.EVENT_WRITE:
                sent = cl.conn.send(cl.outbuf)
                cl.outbuf = cl.outbuf[sent:]
                if not cl.outbuf:
                    self._drop(cl)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(cl)

    def _drop(self, cl: _ControlClient) -> None:
        self.clients.pop(cl.conn.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(cl.conn)
        cl.conn.close()

    def reap(self, now: float) -> None:
        """Drop the clients that took longer than CONTROL_TIMEOUT."""
        for cl in list(self.clients.values()):
            if now > cl.deadline:
                self._drop(cl)

    def request(self, line: bytes) -> dict:
        try:
            req = json.loads(line.decode("utf-8"))
            cmd = req["cmd"]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": "expected one JSON object with a 'cmd' key"}
        handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            return {"ok": False, "error": "unknown command %r; known: %s"
                    % (cmd, ", ".join(self.handlers))}
        return handler(req)


class Discards:
    """'discard-preserved' while the daemon holds the state lock: the same
    checks and destroy as without a daemon, in the job "discard" (the loop
    never waits on zfs); the command line follows it in status's 'discard'."""

    def __init__(self, jobs: JobRunner, config, open_store) -> None:
        self.jobs = jobs
        self.config = config       # config() -> the daemon's current Config
        self.open_store = open_store
        self.last = None           # type: Optional[dict]  # the operator's newest discard

    def request(self, name) -> dict:
        if not isinstance(name, str) or not name:
            return {"ok": False, "error": "discard-preserved needs the dataset's name"}
        if self.jobs.busy("discard"):
            return {"ok": False, "error": "a discard of %s is still running; wait for it"
                    % self.last["dataset"]}
        self.last = {"dataset": name, "state": "running", "error": None}
        log.warning("operator: discard-preserved %s", name)
        cfg = self.config()

        def job(stop):     # on the job's thread
            with self.open_store() as store:
                discard_preserved(Context(cfg, store, Zfs()), name)
        self.jobs.start("discard", job, self._done)
        return {"ok": True}

    def _done(self, result, error) -> None:
        if error is None:
            self.last = dict(self.last, state="done")
            log.info("discarded the preserved dataset %s", self.last["dataset"])
            return
        text = error.message if isinstance(error, FlockerError) else repr(error)
        self.last = dict(self.last, state="failed", error=text)
        log.error("discard-preserved %s: %s", self.last["dataset"], text)


# -- starting up --------------------------------------------------------------

@record(mutable=True)
class Boot:
    """What a daemon starts from (boot_node())."""
    lock: StateLock                # the state file's, held from here on
    state: NodeState
    generation: int                # this boot's
    recovering: bool               # an interrupted role action waits to be finished
    since_role_change: Optional[float]   # seconds since the last role change (None: never)
    peer: Optional[dict]           # the peer row as last persisted
    epoch_seen: int                # the highest epoch the peer announced or left in names


def boot_node(cfg: Config) -> Boot:
    """Open the state file under the daemon's lock, check that it is this
    node's, catch up with the dataset and take the next boot generation."""
    db = cfg.local.state_db
    store = StateStore.open(db, lock_for="daemon", deep_check=True)
    try:
        st = store.initialised_state()
        if st.node != cfg.local_name:
            raise StateError(
                "the state file %s belongs to node %s, but this host is node %s; "
                "fix --node or state_db in the configuration" % (db, st.node, cfg.local_name))
        generation = store.next_generation(int(wall_clock()))
        st, epochs = _catch_up_with_dataset(cfg, store, st)
        _relearn_preserved(cfg, store)
        changed = store.last_role_change()
        peer = store.peer(cfg.peer.name)
        _trim_events(store, cfg)
        boot = Boot(
            lock=store.lock, state=st, generation=generation,
            # a crash cut a role change short: the loop's first role job
            # finishes it, with heartbeats flowing and a backoff when it fails
            recovering=store.unfinished_intent() is not None,
            since_role_change=None if changed is None else max(0.0, wall_clock() - changed),
            peer=peer, epoch_seen=max([(peer or {}).get("epoch") or 0] + epochs))
    except BaseException:
        store.close()
        raise
    store.lock = None     # keep the lock, close the connection
    store.close()
    return boot


def _catch_up_with_dataset(cfg: Config, store: StateStore, st: NodeState
                           ) -> Tuple[NodeState, List[int]]:
    """A state file restored from an older copy must not bring back a
    role or an epoch the node has left: what its dataset says (the role
    marker, the epochs in its snapshot names, returned) wins, and an epoch
    is never used twice."""
    try:
        listing = Zfs().listing(cfg.local.dataset)
    except FlockerError as e:
        log.warning("cannot read the dataset at start (%s); the role comes from the "
                    "state file alone", e.message)
        return st, []
    if listing is None:
        return st, []
    epochs = [e for e in (snapshot_epoch(x.name) for x in listing.snaps) if e is not None]
    adopt = state_behind_dataset(cfg.local_name, st.role, st.epoch,
                                 parse_role_marker(listing.props.get(ROLE_PROPERTY)))
    if adopt is None:
        return st, epochs
    why = ("the state file is older than the dataset %s, which says %s in epoch %d (was "
           "it restored from a backup, or a VM snapshot reverted?): taking the "
           "dataset's role and epoch" % (cfg.local.dataset, adopt[0], adopt[1]))
    log.warning("%s", why)
    store.set_role(adopt[0], adopt[1], why)
    return store.node_state(), epochs


def _relearn_preserved(cfg: Config, store: StateStore) -> None:
    """Divergent data this node kept (preserved_name() beside its
    dataset) that the state file does not list, because it was
    restored from a backup older than the split: listed again, so that
    'status' and 'check' show it to the operator (only listed: nothing
    is changed on it)."""
    ds = cfg.local.dataset
    if "/" not in ds:
        return
    try:
        zfs = Zfs()
        known = {p["dataset"] for p in store.preserved()}
        found = [(n, e) for n, e in preserved_names(ds, zfs.descendants(ds.rsplit("/", 1)[0]))
                 if n not in known]
        for name, epoch in found:
            why = ("found beside %s at start, not listed by the state file (was it "
                   "restored from an older backup?)" % ds)
            log.warning("preserved divergent data %s: %s", name, why)
            store.add_preserved(name, epoch, zfs.origin(name), why)
    except FlockerError as e:
        log.warning("cannot look for preserved divergent data beside %s at start: %s",
                    ds, e.message)


def node_objects(cfg: Config, boot: Boot, report, now: float
                 ) -> Tuple[PeerTracker, RoleKeeper, HeartbeatLink]:
    """The loop's three objects, from what the state file says (boot)."""
    links = [LinkView(i, a, b) for i, (a, b) in
             enumerate(zip(cfg.local.addresses, cfg.peer.addresses))]
    peer = boot.peer
    tracker = PeerTracker(
        cfg.name, cfg.peer.name, wire_keys(cfg.secret, cfg.secret_previous), links,
        cfg.dead_time, now, min_generation=(peer or {}).get("generation") or 0,
        generation=boot.generation)
    keeper = RoleKeeper(cfg, tracker, report, now, boot.state, boot.recovering,
                        boot.since_role_change, boot.epoch_seen)
    saved = None if peer is None else tuple(
        peer[f] for f in ("role", "epoch", "generation", "snapshot", "guid", "health"))
    return tracker, keeper, HeartbeatLink(cfg, tracker, keeper, boot.generation, report,
                                          saved_peer=saved)


def write_pidfile(path: Optional[str]) -> None:
    if path is None:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write("%d\n" % os.getpid())
    except OSError as e:
        raise FlockerError("cannot write the pid file %s: %s; make its directory "
                           "writable or pass another --pidfile" % (path, e.strerror)) from None


def remove_pidfile(path: Optional[str]) -> None:
    """Remove the pid file if it is still this process's."""
    if path is None:
        return
    with contextlib.suppress(OSError):
        with open(path) as f:
            if f.read().strip() == str(os.getpid()):
                os.unlink(path)


def install_signals(wakeup_fd: int, stop, reload, announce) -> None:
    """SIGTERM and SIGINT call stop(signum), SIGHUP reload(signum), SIGUSR2
    announce(signum) (the service address, now); each also wakes the loop
    through wakeup_fd.  SIGUSR1: the stack of every thread to stderr, for a
    daemon that seems stuck (see README)."""
    signal.set_wakeup_fd(wakeup_fd, warn_on_full_buffer=False)
    for signum, fn in ((signal.SIGTERM, stop), (signal.SIGINT, stop),
                       (signal.SIGHUP, reload), (signal.SIGUSR2, announce)):
        signal.signal(signum, lambda number, frame, fn=fn: fn(number))
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def loop_realtime(prio: int) -> None:
    """Real-time scheduling for this thread only (the loop): heartbeats
    go out on time on a busy host.  The job threads stay normal."""
    if not prio:
        return
    try:
        # RESET_ON_FORK: threads and processes it starts run normally
        os.sched_setscheduler(0, os.SCHED_RR | getattr(os, "SCHED_RESET_ON_FORK", 0),
                              os.sched_param(prio))
        log.info("event loop runs with real-time priority %d (SCHED_RR)", prio)
    except (OSError, AttributeError) as e:
        log.warning("cannot give the event loop real-time priority %d (%s); heartbeats "
                    "may be late on a busy host; set realtime_priority = 0 to silence "
                    "this", prio, getattr(e, "strerror", None) or e)


def loop_timeout(timers: List[_Timer], liveness: _Timer, verdict: Optional[float],
                 now: float) -> float:
    """(On the loop.)  How long the loop may wait in select: until the
    next timer.  The liveness check also runs the moment a silence passes
    dead_time (verdict: PeerTracker.next_verdict(); evaluate's rule is
    "longer than": just after it), not at its next tick: only ever earlier
    than its own cadence.  select waits whole ms, rounded up: before the
    verdict it waits the whole ms only, and polls the last fraction of one,
    so that the verdict is not up to a ms late (a silence that long is rare:
    the spin is at most once per verdict).  A timer with some lax (the
    housekeeping ones) may wait that much longer, to share a wakeup."""
    if verdict is not None and verdict + VERDICT_SLACK < liveness.due:
        liveness.due = max(now, verdict + VERDICT_SLACK)
    wake = min(t.due + t.lax for t in timers)
    timeout = max(0.0, wake - time.monotonic())
    if verdict is not None and wake == liveness.due == verdict + VERDICT_SLACK:
        timeout = int(timeout * 1000.0) / 1000.0
    return timeout


def reload_refusal(old: Config, new: Config) -> List[str]:
    """What a SIGHUP cannot change (the daemon must restart for it)."""
    fixed = []
    if new.name != old.name:
        fixed.append("[cluster] name")
    if new.heartbeat_port != old.heartbeat_port:
        fixed.append("[cluster] heartbeat_port")
    for n_old in old.nodes:
        try:
            n_new = new.node(n_old.name)
        except KeyError:
            fixed.append("the node names")
            break
        if n_new.addresses != n_old.addresses:
            fixed.append("[node %s] address" % n_old.name)
        if n_new.state_db != n_old.state_db:
            fixed.append("[node %s] state_db" % n_old.name)
    return fixed


# -- the jobs -----------------------------------------------------------------
#
# What the daemon's slow work does.  Each function here runs on a job's
# own thread (JobRunner), never on the loop: it reads the loop's objects,
# assigns none of them, and hands what it found back as its result (to the
# job's on_done, on the loop), or through jobs.call_soon() for what the
# loop must know before the job ends.

class DaemonJobs:
    """The job bodies fn(stop) of one daemon (see the notes above)."""

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self._witness_requests = itertools.count(1)  # the witness job's request counter

    cfg = property(lambda self: self.daemon.cfg)
    keeper = property(lambda self: self.daemon.keeper)
    tracker = property(lambda self: self.daemon.tracker)
    jobs = property(lambda self: self.daemon.jobs)

    def open_store(self) -> StateStore:
        return self.daemon.open_store()

    def trim_events(self, stop: threading.Event) -> None:
        """Bound the event log (as at start-up)."""
        with self.open_store() as store:
            _trim_events(store, self.cfg)

    def replicate(self, stop: threading.Event):
        """The sync command's cycle: (its start wall time, its result)."""
        if not self.keeper.may_replicate():
            return None
        started = wall_clock()
        with self.open_store() as store:
            return started, replicate_once(self.cfg, store, Zfs(), peer_zfs(self.cfg),
                                           stop=stop, progress=self.daemon.transfer)

    def arbitrator(self, stop: threading.Event):
        """(reachable, how, when the probe started)."""
        cfg = self.cfg
        if cfg.arbitrator is None and cfg.arbitrator_command is None:
            return None
        started = time.monotonic()
        reachable, how = probe_arbitrator(cfg, stop)
        return reachable, how, started

    def witness(self, stop: threading.Event):
        """Ask the witness (see WitnessWatch): for the lease, or only about it."""
        cfg = self.cfg
        if cfg.witness is None or self.tracker is None:
            return None
        want = wants_lease(self.keeper.role, self.tracker.state)
        request = WitnessMessage(
            kind=WITNESS_REQUEST, cluster=cfg.name, node=cfg.local_name,
            nonce=os.urandom(16), generation=self.daemon.link.generation,
            sequence=next(self._witness_requests),
            lease_ms=int(round(cfg.witness_lease * 1000)) if want else 0)
        return ask_witness(cfg, request, stop)

    def snapshots(self, stop: threading.Event):
        """((name, guid) of the newest snapshot of our dataset, ("", 0) if
        none; the GUIDs of all of them), from the same listing the
        replication cycle reads."""
        listing = Zfs().listing(self.cfg.local.dataset)
        if listing is None or not listing.snaps:
            return ("", 0), frozenset()
        guids = frozenset(_guid_number(x.guid) for x in listing.snaps if x.guid.isdigit())
        newest = listing.snaps[-1]
        return (newest.name[:255], _guid_number(newest.guid)), guids

    def check(self, stop: threading.Event):
        cfg, k = self.cfg, self.keeper
        if cfg.service.check_command is None or not k.serving:
            return None
        env = {"FLOCKER_CLUSTER": cfg.name, "FLOCKER_NODE": cfg.local_name,
               "FLOCKER_DATASET": cfg.local.dataset, "FLOCKER_EPOCH": str(k.epoch),
               "FLOCKER_ROLE": k.role}
        env.update(Zfs().device_env(cfg.local.dataset))
        return run_command(cfg.service.check_command, cfg.service.command_timeout, env,
                           stop=stop)

    def role(self, a: RoleAction):
        """fn(stop) for the job "role": finish an interrupted action if
        there is one (then decide again), else run `a`.  Returns (node
        state, failure, kind, the action a recovery finished or None,
        whether an action is still unfinished)."""
        def job(stop):
            tl = self.timeline(a)
            with self.open_store() as store:
                ctx = Context(self.cfg, store, Zfs(timeline=tl), tl)
                ctx.mark("state file open")
                done, failure, ran = None, None, a.kind
                try:
                    if a.kind != DECIDE_FENCE and store.unfinished_intent() is not None:
                        ran = ROLE_RECOVER
                        self.settle(ctx)
                        done = recover_intent(ctx, stop, quiesce=self.quiesce)
                    elif a.kind != ROLE_RECOVER:
                        self.run_action(a, ctx, stop)
                except FlockerError as e:
                    failure = e
                return (store.node_state(), failure, ran, done,
                        store.unfinished_intent() is not None)
        return job

    @staticmethod
    def timeline(a: RoleAction) -> Optional[Timeline]:
        """A promotion's or a demotion's timeline (see Timeline), from the
        moment the peer's silence passed dead_time when that led to it,
        else from the decision."""
        if a.kind not in (DECIDE_PROMOTE, DECIDE_STEP_DOWN, DECIDE_HANDOVER):
            return None
        tl = (Timeline(a.deadline, "the peer's silence passed dead_time")
              if a.deadline is not None else Timeline(a.decided, "the decision"))
        tl.mark("decided", a.decided)
        tl.mark("job thread")
        return tl

    def settle(self, ctx: Context) -> None:
        """Before a role action writes to the state file: the events that
        led to it are written first (the state writer's queue, written
        here: see StoreWriter)."""
        if self.daemon.writer is not None:
            with ctx.store.relaxed():    # synced with the action's first write
                self.daemon.writer.write_pending(ctx.store, 2.0)
        ctx.mark("events written")

    def run_action(self, a: RoleAction, ctx: Context, stop: threading.Event) -> None:
        if a.kind in (DECIDE_PROMOTE, DECIDE_RESUME):
            promote(ctx, a.epoch, a.reason, settle=lambda: self.settle(ctx))
            return
        self.settle(ctx)
        if a.kind == DECIDE_STEP_DOWN:
            demote(ctx, a.epoch, a.reason, quiesce=self.quiesce)
        elif a.kind == DECIDE_HANDOVER:
            demote(ctx, a.epoch, a.reason, handover=True, stop=stop,
                   quiesce=self.quiesce_handover, resume=True)
        elif a.kind == DECIDE_FENCE:
            load_dataset_key(ctx)      # a node that could not take over fences nobody
            fence_peer(ctx, a.epoch, stop)
        elif a.kind == DECIDE_RESOLVE:
            resolve_divergence(ctx, peer_zfs(self.cfg), stop, winner_choice=a.winner,
                               quiesce=self.quiesce,
                               peer_stopped=self.wait_peer_stopped,
                               pause=self.end_replication, serving=a.serving,
                               yield_first=a.yield_first)

    def quiesce(self) -> None:
        """Once the user system is stopped: a master giving up its role
        says so in its next heartbeat and ends the replication cycle in
        flight (it aborts cleanly; nothing half-done) before the dataset
        changes.  A cycle stuck in ssh timeouts can keep the rest of the
        step-down waiting; the user system is already stopped then."""
        self.jobs.call_soon(self.keeper.stopped_serving)
        self.end_replication()

    def quiesce_handover(self) -> None:
        """quiesce() for a planned switchover: the cycle in flight may end
        by itself first, for up to HANDOVER_CYCLE_WAIT.  What it carries
        was written before the stop, and the final snapshot then need not
        carry it again; a cycle cut short also closes its ssh connection,
        which the final snapshot's transfer opens again (a new connection,
        a new gate).  Under a steady writer that was most of a switchover's
        outage beyond the user system's own stop and start."""
        self.jobs.call_soon(self.keeper.stopped_serving)
        self.jobs.wait("replicate", HANDOVER_CYCLE_WAIT)
        self.end_replication()

    def end_replication(self) -> None:
        """End the replication cycle in flight, if any."""
        if not self.jobs.cancel("replicate", timeout=60.0):
            raise ActionError("the replication cycle did not stop within 60 s")

    def wait_peer_stopped(self, timeout: float) -> bool:
        """The winner of a resolution waits until the peer no longer serves,
        so that the address is announced after the loser let it go."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.daemon._stop_signal:
            hb, seen = self.tracker.last, self.tracker.last_seen
            if seen is None or time.monotonic() - seen > self.cfg.dead_time or (
                    hb is not None and not hb.flags & FLAG_SERVING and hb.role == ROLE_SLAVE):
                return True      # (read directly: the loop may be stopping)
            time.sleep(0.1)
        return False



# -- reporting ----------------------------------------------------------------

class Reporter:
    """The daemon's log lines and its writes to the state file (events,
    the peer's row, role marks), for the loop and what it owns."""

    def __init__(self) -> None:
        self.writer = None         # type: Optional[StoreWriter]  # once the daemon runs
        self._quiet_until = {}     # type: Dict[str, float]  # see log_quietly

    def report(self, note: Note) -> None:
        """Carry out what the keeper or the link has to say (see Note)."""
        if note.level is not None:
            if note.quiet is not None:
                self.log_quietly(note.quiet[0], note.level, note.message, note.quiet[1])
            else:
                log.log(note.level, "%s", note.message)
        if note.event is not None:
            self.event(*note.event)
        if note.write is not None:
            self.submit(note.write)

    def log_quietly(self, topic: str, level: int, message: str, every: float = 60.0) -> None:
        """Log message unless this topic was logged less than `every` s ago."""
        now = time.monotonic()
        if now < self._quiet_until.get(topic, -1.0):
            return
        self._quiet_until[topic] = now + every
        log.log(level, "%s", message)

    def event(self, kind: str, message: str, level: str = "info") -> None:
        self.submit(lambda store: store.record_event(kind, message, level))

    def submit(self, fn) -> None:
        if self.writer is not None:
            self.writer.submit(fn)


# -- the loop -----------------------------------------------------------------

class Daemon:
    """The long-running process of one node: the loop (sockets, timers,
    signals, the job runner) over the role keeper, the heartbeat link and
    the control server (see the notes at the top of this section)."""

    def __init__(self, cfg: Config, pidfile: Optional[str] = None) -> None:
        self.cfg = cfg
        self.pidfile = pidfile
        self.sel = selectors.DefaultSelector()
        self.jobs = JobRunner(self._wake_from_thread)
        self.timers = []           # type: List[_Timer]
        self._liveness = None      # type: Optional[_Timer]  # the liveness check's (see _loop)
        self.periodic = []         # type: List[Tuple[str, object, object, object, object]]
        self.systemd = SystemdNotifier()
        self.lock = None           # type: Optional[StateLock]  # held while the daemon runs
        self.writer = None         # type: Optional[StoreWriter]
        # made by run() from what the state file says (boot_node()):
        self.tracker = None        # type: Optional[PeerTracker]  # the peer, from its packets
        self.keeper = None         # type: Optional[RoleKeeper]   # what this node is and does
        self.link = None           # type: Optional[HeartbeatLink]
        self.control = ControlServer(control_socket_path(cfg.local.state_db), self.sel,
                                     self._control_handlers())
        self.transfer = TransferProgress()   # the transfer in flight (the job writes it)
        self.discards = Discards(self.jobs, lambda: self.cfg, self.open_store)
        self.worst_lag = self.last_lag = 0.0  # how late the loop ran a timer (seconds)
        self.started_mono = self.started_wall = self.stats_since = 0.0
        self._stop_signal = 0      # set by SIGTERM, SIGINT (the signal's number)
        self._reload_pending = False   # set by SIGHUP
        self.reporter = Reporter()  # log lines and state-file writes
        self.work = DaemonJobs(self)  # what the jobs do, on their threads
        self._wake_r = self._wake_w = None   # finished jobs wake the loop through these
        self._sig_r = self._sig_w = None     # signals wake it through these
        self.install_jobs()

    # -- jobs (each fn(stop) runs on its job's thread: see the top of this section) ---

    def add_periodic(self, name: str, every, fn, on_done=None, wanted=None) -> None:
        """Run fn(stop) off the loop every `every(cfg)` seconds (skipped
        while the previous run of the same name still runs); on_done(result,
        error) runs on the loop.  The replication cycle plugs in here.
        wanted(cfg): when given and false (nothing is configured for the
        job), no job is started and the timer looks again every second: a
        hand-over to a job thread and back every heartbeat, for a job with
        nothing to do, was most of an idle daemon's wakeups."""
        self.periodic.append((name, every, fn, on_done, wanted))

    def open_store(self) -> StateStore:
        """A state-file connection for a job thread (one per thread; sqlite
        connections do not cross threads).  It writes under the daemon's
        lock, and closing it does not release that lock."""
        return StateStore.open(self.cfg.local.state_db, lock=_BorrowedLock(self.lock))

    def install_jobs(self) -> None:
        """The periodic jobs; what each finds goes to the role keeper."""
        self.add_periodic("check", lambda c: c.service.check_interval, self.work.check,
                          lambda r, e: self.keeper.checked(r, e))
        self.add_periodic("snapshots", lambda c: max(5.0, c.replication_interval),
                          self.work.snapshots, self._scanned)
        self.add_periodic("replicate", lambda c: c.replication_interval, self.work.replicate,
                          self._replicated)
        self.add_periodic("arbitrator", lambda c: c.heartbeat_interval, self.work.arbitrator,
                          lambda r, e: self.keeper.arbitrator_answered(r, e, time.monotonic()),
                          lambda c: c.arbitrator is not None or c.arbitrator_command is not None)
        self.add_periodic("witness", lambda c: c.heartbeat_interval, self.work.witness,
                          lambda r, e: self.keeper.witness.answered(r, e, time.monotonic()),
                          lambda c: c.witness is not None)
        self.add_periodic("trim-events", lambda c: EVENT_TRIM_INTERVAL, self.work.trim_events,
                          lambda r, e: e is not None and self.reporter.log_quietly(
                              "trim-events", logging.WARNING, "cannot trim the event log: %s" % e))

    # -- role actions ---------------------------------------------------------

    def _act(self, action: Optional[RoleAction]) -> None:
        """Run the keeper's role action in the job "role"; its outcome goes
        back to the keeper's role_done()."""
        if action is None:
            return
        if action.kind == DECIDE_RESOLVE:
            self.link.answer_soon()    # tell the peer at once
        if not self.jobs.start("role", self.work.role(action), self._role_done):
            self.keeper.acting = False   # (never: the keeper hands out one at a time)

    def _role_done(self, result, error) -> None:
        """The role job's outcome to the keeper; what it changed (a role, an
        epoch, a release) goes out in a heartbeat at once, so that the peer
        acts on it without waiting for the next beat (a slave takes over a
        released role within moments, not a heartbeat_interval later)."""
        self.keeper.role_done(result, error, time.monotonic())
        self.link.heartbeat.due = min(self.link.heartbeat.due, time.monotonic())

    def _replicated(self, result, error) -> None:
        """A cycle that carried data starts again at once: under a steady
        writer the replica then lags by about one cycle, not by a cycle and
        up to an interval more (a tick comes while the cycle runs, and is
        skipped).  One that found nothing new waits replication_interval."""
        now = time.monotonic()
        self._act(self.keeper.replicated(result, error, now))
        if error is None and result is not None and result[1].sent:
            for t in self.timers:
                t.due = min(t.due, now) if t.name == "job replicate" else t.due

    def _scanned(self, result, error) -> None:
        self.keeper.snapshots_scanned(result, error)
        self._look_now()

    def _look_now(self) -> None:
        """Decide now, not at the next liveness tick: the peer's heartbeat
        said something new, or this node's own snapshots were read."""
        if self._liveness is not None:
            self._liveness.due = min(self._liveness.due, time.monotonic())

    # -- running --------------------------------------------------------------

    def run(self) -> int:
        boot = boot_node(self.cfg)
        self.lock = boot.lock
        try:
            self._start(boot)
            self._loop()
            return EXIT_OK
        finally:
            self.systemd.notify("STOPPING=1")
            self._shutdown()
            self.systemd.close()

    def _start(self, boot: Boot) -> None:
        cfg = self.cfg
        now = time.monotonic()
        self.started_mono = self.stats_since = now
        self.started_wall = wall_clock()
        self.tracker, self.keeper, self.link = node_objects(cfg, boot, self.reporter.report,
                                                            now)
        self.link.news = self._look_now
        write_pidfile(self.pidfile)
        self._open_sockets()
        self._install_signals()
        self.writer = self.reporter.writer = StoreWriter(cfg.local.state_db, self.lock)
        self.writer.start()
        k = self.keeper
        self.reporter.event("daemon", "daemon started (pid %d, generation %d, role %s, "
                            "epoch %d)" % (os.getpid(), boot.generation, k.role, k.epoch))
        log.info("daemon of node %s started: generation %d, role %s, epoch %d, heartbeats "
                 "every %g s on %s, peer dead after %g s", cfg.local_name, boot.generation,
                 k.role, k.epoch, cfg.heartbeat_interval, ", ".join(cfg.local.addresses),
                 cfg.dead_time)

    def _open_sockets(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._sig_r, self._sig_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w, self._sig_r, self._sig_w):
            s.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self.sel.register(self._sig_r, selectors.EVENT_READ, self._on_wake)
        self.link.open(self.sel)
        self.control.open()

    def _install_signals(self) -> None:
        install_signals(self._sig_w.fileno(),
                        stop=lambda signum: setattr(self, "_stop_signal", signum),
                        reload=lambda signum: setattr(self, "_reload_pending", True),
                        announce=lambda signum: setattr(self.keeper, "announce_at", 0.001))

    def _wake_from_thread(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass   # already awake (the buffer is full) or shutting down

    def _on_wake(self, sock, mask) -> None:
        try:
            while sock.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        self.jobs.collect()

    def _loop(self) -> None:
        loop_realtime(self.cfg.realtime_priority)
        now = time.monotonic()
        c = lambda: self.cfg   # noqa: E731 - timers read the current config
        liveness = self._liveness = _Timer(
            "liveness", lambda: min(0.25, c().heartbeat_interval), self._check_liveness, now)
        heartbeat, persist, rejections = self.link.timers(now)
        self.timers = [
            heartbeat, liveness, persist, rejections,
            _Timer("control", lambda: 1.0, self.control.reap, now + 1.0, lax=0.5),
            # (every 0.1 s only while an announcement waits: an idle
            # daemon's wakeups are its idle cost)
            _Timer("announce", lambda: 0.1 if self.keeper.announce_at else 1.0,
                   self._announce_due, now + 0.1),
            _Timer("systemd", lambda: self.systemd.watchdog or 5.0, self._notify_systemd, now,
                   lax=(self.systemd.watchdog or 5.0) / 4),
            _Timer("metrics", lambda: METRICS_EVERY, self._write_metrics, now + 0.5, lax=1.0)]
        for name, every, fn, on_done, wanted in self.periodic:
            wanted = wanted or (lambda cfg: True)
            self.timers.append(_Timer(
                "job " + name, lambda every=every, wanted=wanted:
                    every(c()) if wanted(c()) else 1.0,
                lambda now, name=name, fn=fn, on_done=on_done, wanted=wanted:
                    wanted(c()) and self.jobs.start(name, fn, on_done), now + 0.05))
        while not self._stop_signal:
            if self._reload_pending:
                self._reload_pending = False
                self._start_reload()
            now = time.monotonic()
            lag = now - min(t.due + t.lax for t in self.timers)
            if lag > self.cfg.dead_time * STALL_FRACTION:
                self.tracker.woke_from_stall(now)
                log.warning("this daemon did not run for %.2f s (stopped or starved); "
                            "judging the peer only on heartbeats from now on", lag)
            last, worst = run_timers(self.timers, now, heartbeat, liveness)
            if last is not None:
                self.last_lag, self.worst_lag = last, max(self.worst_lag, worst)
            timeout = loop_timeout(self.timers, liveness, self.tracker.next_verdict(),
                                   time.monotonic())
            for key, mask in self.sel.select(timeout):
                key.data(key.fileobj, mask)

    def _check_liveness(self, now: float) -> None:
        for message in self.tracker.evaluate(now):
            level = "warning" if (" dead" in message or " down" in message) else "info"
            log.log(logging.WARNING if level == "warning" else logging.INFO, "%s", message)
            self.reporter.event("liveness", message, level)
        if self.keeper.observe_peer(now):
            self.jobs.start("snapshots", self.work.snapshots, self._scanned)
        if not self._stop_signal:
            self._act(self.keeper.next_action(now))

    def _write_metrics(self, now: float) -> None:
        path = self.cfg.metrics_file
        if path is None:
            return
        text = render_metrics(self.cfg, self.live_status(now), wall_clock())
        try:
            write_atomically(path, text)
        except OSError as e:
            self.reporter.log_quietly("metrics", logging.ERROR, "cannot write the metrics file %s: "
                              "%s; check [cluster] metrics_file" % (path, e.strerror), 600)

    def _notify_systemd(self, now: float) -> None:
        self.systemd.beat("%s, epoch %d; peer %s %s" % (
            self.keeper.role, self.keeper.epoch, self.cfg.peer.name, self.tracker.state))

    def _announce_due(self, now: float) -> None:
        """The service address announced again: announce_again after the
        user system started here, and on request (SIGUSR2, 'announce')."""
        k = self.keeper
        if not k.announce_at or now < k.announce_at:
            return
        k.announce_at = 0.0
        sa, svc = self.cfg.service.service_address, self.cfg.service
        if sa is None or not k.serving or self.jobs.busy("announce"):
            return
        self.jobs.start("announce", lambda stop: announce_address(
            sa, svc.announce_count, svc.announce_interval), self._announced)

    def _announced(self, result, error) -> None:
        if error is not None:
            self.reporter.log_quietly("announce", logging.WARNING, "cannot announce %s: %s" % (
                self.cfg.service.service_address, error))
        else:
            log.info("announced %s again (%d packets)", self.cfg.service.service_address,
                     result)

    # -- configuration reload -------------------------------------------------

    def _start_reload(self) -> None:
        path, node = self.cfg.path, self.cfg.local_name
        if not self.jobs.start("reload", lambda stop: load_config(path, node),
                               self._reload_done):
            self._reload_pending = True   # one is running: do it again after

    def _reload_done(self, new: Optional[Config], error) -> None:
        if error is not None:
            why = error.message if isinstance(error, FlockerError) else repr(error)
            log.error("SIGHUP: the configuration is not valid, keeping the old one: %s", why)
            self.reporter.event("config", "reload refused, old configuration kept: %s" % why, "error")
            return
        fixed = reload_refusal(self.cfg, new)
        if fixed:
            why = ("changing %s needs a restart of the daemon; keeping the old "
                   "configuration" % ", ".join(fixed))
            log.error("SIGHUP: %s", why)
            self.reporter.event("config", "reload refused: %s" % why, "error")
            return
        self.cfg = self.link.cfg = new
        self.keeper.reconfigured(new)
        self.tracker.keys = wire_keys(new.secret, new.secret_previous)
        self.tracker.dead_time = new.dead_time
        log.info("SIGHUP: configuration reloaded from %s (key id %s)", new.path, new.key_id)
        self.reporter.event("config", "configuration reloaded (key id %s)" % new.key_id)

    # -- the control socket's requests ----------------------------------------

    def _control_handlers(self) -> Dict[str, object]:
        k = lambda: self.keeper   # noqa: E731 - made by run()
        return {
            "ping": lambda req: {"ok": True, "pid": os.getpid()},
            "status": lambda req: {"ok": True, "status": self.live_status(time.monotonic())},
            "promote": lambda req: k().operator_switchover("promote", req, time.monotonic()),
            "demote": lambda req: k().operator_switchover("demote", req, time.monotonic()),
            "resolve": lambda req: k().operator_resolve(req.get("winner")),
            "discard-preserved": lambda req: self.discards.request(req.get("dataset")),
            "announce": lambda req: k().operator_announce(time.monotonic()),
            "reset-stats": lambda req: self._reset_stats(),
        }

    def _reset_stats(self) -> dict:
        self.tracker.reset_stats()
        self.worst_lag = 0.0
        self.stats_since = time.monotonic()
        return {"ok": True}

    def live_status(self, now: float) -> dict:
        status = {
            "pid": os.getpid(),
            "started": self.started_wall,
            "uptime_seconds": round(now - self.started_mono, 3),
            "discard": self.discards.last,
            "transfer": self.transfer.view(now),
            "heartbeat_interval": self.cfg.heartbeat_interval,
            "dead_time": self.cfg.dead_time,
            "worst_lag_seconds": round(self.worst_lag, 4),
            "last_lag_seconds": round(self.last_lag, 4),
            "stats_age_seconds": round(now - self.stats_since, 3),
            "jobs": self.jobs.running(),
            "state_writes_dropped": self.writer.dropped if self.writer else 0,
        }
        status.update(self.keeper.status(now))
        status.update(self.link.status(now))
        return status

    # -- stopping -------------------------------------------------------------

    def _shutdown(self) -> None:
        """Leave everything consistent: jobs stopped (their commands
        killed), the user system stopped with a master's daemon (it never
        runs unsupervised; the role stays), the last peer observation and a
        'stopped' event written, sockets, pid file and lock released."""
        k = self.keeper
        serving_master = k is not None and k.role == ROLE_MASTER and k.serving
        if serving_master and self.link.socks:
            # first of all (ending a transfer may take longer than dead_time,
            # and no heartbeat goes out meanwhile): the slave lacks what was
            # written since the last replication and must not take over
            # (see README, "Stopping")
            k.leaving = True
            self.link.announce_leaving()
        left = self.jobs.stop_all(timeout=30.0)
        if left:
            log.error("jobs still running at exit, abandoned: %s", ", ".join(left))
        if k is not None and k.role == ROLE_MASTER and k.serving and self.lock is not None:
            try:
                with self.open_store() as store:
                    stop_serving(Context(self.cfg, store, Zfs()), "the daemon is stopping")
            except FlockerError as e:
                log.error("stopping the user system failed: %s", e.message)
            k.stopped_serving()
        if self.writer is not None:
            self.link.persist_peer(time.monotonic(), force=True)
            self.reporter.event("daemon", "daemon stopped%s" % (
                " by signal %d" % self._stop_signal if self._stop_signal else ""))
            if not self.writer.close():
                log.error("the state writer did not finish in time")
        self._close()

    def _close(self) -> None:
        if self.link is not None:
            self.link.close()
        self.control.close()
        if self._sig_w is not None:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(-1)
        for s in (self._wake_r, self._wake_w, self._sig_r, self._sig_w):
            if s is not None:
                s.close()
        remove_pidfile(self.pidfile)
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self._stop_signal:
            log.info("stopped by signal %d", self._stop_signal)


# -- the witness's server -----------------------------------------------------
#
# 'flocker_failover.py witness' on a third machine: one UDP socket, one
# thread, no sqlite.  Each request is judged by the LeaseBook (section 6);
# when the answer changes what a restart must know (a new holder, a longer
# lease), the state file is replaced and synced to disk BEFORE the answer
# leaves, so a witness that crashes right after answering still knows,
# when it comes back, whom it lent the lease to.  Requests that fail
# verification or are not fresh get no answer at all (nothing to learn,
# nothing to amplify); a summary of them is logged every minute.

WITNESS_PORT = 7789
WITNESS_STATE = "/var/lib/flocker/witness.json"
WITNESS_MAX_LEASE_DEFAULT = 60.0
WITNESS_SUMMARY_EVERY = 60.0


def write_durably(path: str, text: str) -> None:
    """write_atomically, and the rename itself synced to disk too."""
    write_atomically(path, text, 0o644)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_witness_state(path: str) -> Optional[dict]:
    """{cluster: record} from the witness's state file; None when there is
    none yet.  Raises StateError when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StateError(
            "the witness's state file %s cannot be used (%s); it says which node holds "
            "each lease: restore it, or move it aside and the witness lends nothing for "
            "--max-lease seconds after it starts" % (path, e)) from None
    if not isinstance(data, dict) or data.get("version") != 1 or \
            not isinstance(data.get("clusters"), dict):
        raise StateError("the witness's state file %s is not one this program wrote (no "
                         "version 1); move it aside (the witness then lends nothing for "
                         "--max-lease seconds after it starts)" % path)
    return data["clusters"]


class WitnessServer:
    """The witness's process: answers the nodes' lease requests."""

    def __init__(self, listen: Tuple[str, int], clusters: Dict[str, Dict[bytes, Tuple[str, bytes]]],
                 state_path: str, max_lease: float) -> None:
        self.listen = listen
        self.clusters = clusters         # cluster name -> its keys (wire_keys)
        self.state_path = state_path
        self.max_lease = max_lease
        self.book = None                 # type: Optional[LeaseBook]
        self.dirty = False               # the book holds a change not yet on disk
        self.sock = None                 # type: Optional[socket.socket]
        self.stop = False
        self.rejected = {r: 0 for r in REJECT_REASONS}
        self.answered = 0
        self._summary_at = 0.0

    def open(self, now: float) -> None:
        saved = read_witness_state(self.state_path)
        self.book = LeaseBook(self.max_lease, now, saved)
        if saved is None:
            log.warning("no state file %s: lending no lease for %.1f s (the longest this "
                        "witness may have lent, plus its margin)", self.state_path,
                        self.book.blocked_until - now)
            try:
                self._save()         # so that the next start knows it started before
            except OSError as e:
                raise StateError("cannot write the witness's state file %s: %s; it must be "
                                 "writable (--state names another)"
                                 % (self.state_path, e.strerror or e)) from None
        for name, rec in sorted((saved or {}).items()):
            if rec.get("holder"):
                log.info("cluster %s: %s held the lease (%g s) before this start; only it "
                         "may have it for the next %.1f s", name, rec["holder"],
                         rec.get("lease") or 0,
                         (rec.get("lease") or 0) + witness_margin(rec.get("lease") or 0))
        host, port = self.listen
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                  socket.SOCK_DGRAM)
        self.sock.bind((host, port))

    def _save(self) -> None:
        text = json.dumps({"version": 1, "clusters": self.book.record()}, indent=1,
                          sort_keys=True) + "\n"
        write_durably(self.state_path, text)

    def handle(self, packet: bytes, now: float) -> Optional[bytes]:
        """The answer to one datagram, or None (none is sent)."""
        cluster = witness_cluster(packet)
        keys = self.clusters.get(cluster or "")
        try:
            if keys is None:
                raise WireReject("wrong_cluster", "cluster %r is not served here" % cluster)
            m = decode_witness(packet, keys)
            if m.kind != WITNESS_REQUEST:
                raise WireReject("malformed", "an answer sent to the witness")
        except WireReject as e:
            self.rejected[e.reason] += 1
            return None
        before = self.book.clusters.get(m.cluster)
        holder = before.holder if before is not None else None
        a = self.book.request(m.cluster, m.node, m.generation, m.sequence,
                              m.lease_ms / 1000.0, now)
        if a is None:
            self.rejected["replay"] += 1
            return None
        if a.persist or self.dirty:
            try:
                self._save()
                self.dirty = False
            except OSError as e:
                self.dirty = True
                log.error("cannot write the state file %s: %s; lending nothing until it "
                          "can be written", self.state_path, e.strerror or e)
                return None
        if a.answer == WITNESS_GRANTED and holder != m.node:
            log.info("cluster %s: lease lent to %s (%g s)%s", m.cluster, m.node, a.lease,
                     " after %s's ran out" % holder if holder else "")
        secret = [k[1] for k in keys.values() if k[0] == m.key_id][0]
        self.answered += 1
        return encode_witness(replace(
            m, kind=WITNESS_ANSWER, lease_ms=int(round(a.lease * 1000)), answer=a.answer,
            wait_ms=int(max(0.0, a.wait) * 1000), holder=a.holder[:200]), secret)

    def serve(self) -> None:
        """Answer until stop is set (the signal handlers set it)."""
        self.sock.settimeout(0.5)
        while not self.stop:
            try:
                packet, addr = self.sock.recvfrom(2048)
            except socket.timeout:
                packet = None
            except InterruptedError:
                continue
            except OSError as e:
                log.warning("receive: %s", e.strerror or e)
                continue
            now = time.monotonic()
            if packet is not None:
                answer = self.handle(packet, now)
                if answer is not None:
                    with contextlib.suppress(OSError):
                        self.sock.sendto(answer, addr)
            if now >= self._summary_at:
                self._summary_at = now + WITNESS_SUMMARY_EVERY
                bad = ", ".join("%s %d" % kv for kv in sorted(self.rejected.items()) if kv[1])
                if bad:
                    log.warning("refused datagrams (no answer sent): %s", bad)
                    self.rejected = {r: 0 for r in REJECT_REASONS}

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def write_atomically(path: str, text: str, mode: int = 0o644) -> None:
    """Replace path with text so that a reader sees the old or the new
    file, never half of one (a temporary file beside it, then rename)."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def query_daemon(state_db: str, request: dict, timeout: float = 3.0) -> Optional[dict]:
    """Ask the running daemon (one JSON line out, one back).  None when no
    daemon listens; FlockerError when one listens but does not answer."""
    path = control_socket_path(state_db)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except OSError as e:
            raise FlockerError("cannot reach the daemon at %s: %s" % (path, e.strerror)) from None
        closed = ("the daemon at %s closed the connection without an answer (%%s): it is "
                  "stopping or restarting, or it failed; whether it carried out the request "
                  "is not known: check its log and 'status'" % path)
        try:
            s.sendall((json.dumps(request) + "\n").encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    if not data:
                        raise FlockerError(closed % "end of stream")
                    break
                data += chunk
                if len(data) > 1 << 20:
                    break
        except socket.timeout:
            raise FlockerError("the daemon at %s did not answer within %g s; it may be hung "
                               "(check its log)" % (path, timeout)) from None
        except (ConnectionResetError, BrokenPipeError) as e:
            raise FlockerError(closed % e.strerror) from None
        except OSError as e:
            raise FlockerError("the daemon at %s did not answer: %s; it may be hung "
                               "(check its log)" % (path, e.strerror or e)) from None
    finally:
        s.close()
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError:
        raise FlockerError("the daemon at %s sent an unreadable answer" % path) from None


# ===========================================================================
# 10. The command line
# ===========================================================================


def config_of(cfg_path: str, node: Optional[str]) -> Config:
    """The configuration (load_config); this node's zfs usage text is kept
    beside its state file from now on (use_usage_cache)."""
    cfg = load_config(cfg_path, node)
    use_usage_cache(cfg.local.state_db)
    return cfg


def cmd_genkey(args, cfg_path: str) -> int:
    key = os.urandom(32).hex() + "\n"
    if args.output is None:
        sys.stdout.write(key)
        return EXIT_OK
    try:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise FlockerError("cannot create %s: %s%s" % (
            args.output, e.strerror,
            "; it already exists, and a key is never overwritten: move it away first"
            if e.errno == errno.EEXIST else "")) from None
    with os.fdopen(fd, "w") as f:
        f.write(key)
    print("wrote a new key to %s (key id %s); copy this file to the other node with "
          "mode 0600" % (args.output, key_id(key.strip().encode())))
    return EXIT_OK


def cmd_config_check(args, cfg_path: str) -> int:
    cfg = config_of(cfg_path, args.node)
    print("\n".join(describe_config(cfg)))
    print("# configuration is valid", file=sys.stderr)
    return EXIT_OK


def cmd_init(args, cfg_path: str) -> int:
    cfg = config_of(cfg_path, args.node)
    summary, done = init_node(cfg, args.role, args.force, Zfs())
    for line in done:
        print("  " + line)
    print(summary)
    return EXIT_OK


def gather_report(cfg: Config) -> dict:
    """status_report with the running daemon's live values when one answers."""
    live = None
    try:
        answer = query_daemon(cfg.local.state_db, {"cmd": "status"})
        if answer is not None and answer.get("ok"):
            live = answer["status"]
    except FlockerError as e:
        log.warning("%s; showing values from the state file", e.message)
    return status_report(cfg, live=live, zfs=Zfs())


def cmd_status(args, cfg_path: str) -> int:
    cfg = config_of(cfg_path, args.node)
    report = gather_report(cfg)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_status(report))
    return EXIT_OK


_RELATIVE = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_seconds_arg(option: str, text: str) -> float:
    """--warn/--crit: seconds, or with a unit: 90s, 30m, 2h, 1d."""
    m = re.match(r"^(\d+(?:\.\d+)?)([smhd]?)$", text.strip())
    if not m:
        raise FlockerError("%s %s: expected seconds (such as 600) or a time with a unit "
                           "(90s, 30m, 2h, 1d)" % (option, text))
    return float(m.group(1)) * _RELATIVE[m.group(2) or "s"]


def cmd_check(args, cfg_path: str) -> int:
    try:
        warn = crit = None
        if args.warn is not None:
            warn = parse_seconds_arg("--warn", args.warn)
        if args.crit is not None:
            crit = parse_seconds_arg("--crit", args.crit)
        if warn is not None and crit is not None and warn > crit:
            raise FlockerError("--warn %s is more than --crit %s; the warning threshold must "
                               "be the smaller one" % (args.warn, args.crit))
        cfg = config_of(cfg_path, args.node)
        if args.deep:
            try:   # the whole file read and checked (PRAGMA quick_check)
                StateStore.open(cfg.local.state_db, deep_check=True).close()
            except CorruptState as e:
                code, text, perf = CHECK_CRITICAL, e.message, ""
                print("FLOCKER %s - %s" % (CHECK_NAMES[code], text))
                return code
        code, text, perf = check_verdict(gather_report(cfg), expect_daemon=not args.no_daemon,
                                         warn=warn, crit=crit)
    except FlockerError as e:
        code, text, perf = CHECK_UNKNOWN, e.message, ""
    if code != CHECK_OK or not args.quiet:
        print("FLOCKER %s - %s%s" % (CHECK_NAMES[code], text, (" | " + perf) if perf else ""))
    return code


CHECK_EPILOG = """\
Replication lag: for how many seconds writes on the master may be missing
on the slave. On the master: since the start of its last successful cycle
when the slave holds all its snapshots, else the age of the newest
snapshot the slave holds. On the slave: since it heard the master name its own newest
snapshot as the master's newest, else the age of that snapshot. A quiet
dataset takes no new snapshots, and shows no lag while cycles succeed.
With --warn or --crit, no replica at all is CRITICAL.

Exit status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.  Performance data:
epoch, peer_alive, preserved, rejected (counter), peer_age, lag (with its
thresholds), pending (master: snapshots the slave still lacks).
"""


def _add_check(p) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = CHECK_EPILOG
    p.add_argument("--quiet", "-q", action="store_true",
                   help="print nothing when all is well (for cron: mail only problems)")
    p.add_argument("--no-daemon", action="store_true",
                   help="do not expect a running daemon on this node")
    p.add_argument("--warn", "-w", metavar="SECONDS",
                   help="WARNING when the replication lag is above this (600, 90s, 30m, "
                        "2h, 1d)")
    p.add_argument("--crit", "-c", metavar="SECONDS",
                   help="CRITICAL when the replication lag is above this")
    p.add_argument("--deep", action="store_true",
                   help="also read and check the whole state file (PRAGMA quick_check; "
                        "CRITICAL when it is damaged): e.g. once a day")


def parse_since(text: str, now: float) -> float:
    """--since: an age (90s, 30m, 2h, 7d) or a UTC time (2026-11-24 or
    2026-11-24T17:30[:00]).  Returns a Unix time."""
    m = re.match(r"^(\d+(?:\.\d+)?)([smhd])$", text)
    if m:
        return now - float(m.group(1)) * _RELATIVE[m.group(2)]
    import calendar
    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S",
                "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return float(calendar.timegm(time.strptime(text, fmt)))
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(
        "expected an age such as 30m, 2h or 7d, or a UTC time such as 2026-11-24T17:30, "
        "found %r" % text)


def cmd_history(args, cfg_path: str) -> int:
    cfg = config_of(cfg_path, args.node)
    with StateStore.open(cfg.local.state_db, readonly=True) as store:
        events = store.events(limit=args.limit, since=args.since or 0.0)
    if args.json:
        print(json.dumps(events, indent=2))
        return EXIT_OK
    for e in events:
        print("%s  %-7s %-10s %s" % (_fmt_time(e["ts"]), e["level"], e["kind"], e["message"]))
    return EXIT_OK


def _add_history(p) -> None:
    p.add_argument("--since", metavar="WHEN", type=lambda text: parse_since(text, wall_clock()),
                   help="only events from then on: an age (30m, 2h, 7d) or a UTC time "
                        "(2026-11-24T17:30)")
    p.add_argument("--limit", type=int, default=1000, metavar="N",
                   help="at most the newest N events (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {id, ts, level, kind, message}")


def cmd_discard_preserved(args, cfg_path: str) -> int:
    cfg = config_of(cfg_path, args.node)
    if not args.yes:
        if not sys.stdin.isatty():
            raise FlockerError("discard-preserved destroys %s for good; confirm with --yes "
                               "(no terminal to ask on)" % args.name)
        answer = input("This destroys %s and every snapshot of it for good.\n"
                       "Type its name to confirm: " % args.name)
        if answer.strip() != args.name:
            raise FlockerError("not confirmed; nothing was destroyed")
    answer = query_daemon(cfg.local.state_db, {"cmd": "discard-preserved",
                                               "dataset": args.name})
    if answer is None:       # no daemon: this process does it, under the lock
        with StateStore.open(cfg.local.state_db, lock_for="discard-preserved") as store:
            discard_preserved(Context(cfg, store, Zfs()), args.name)
        print("destroyed %s" % args.name)
        return EXIT_OK
    if not answer["ok"]:
        raise FlockerError(answer["error"])
    deadline = time.monotonic() + 300.0
    while time.monotonic() < deadline:     # the running daemon does it, in a job
        live = (query_daemon(cfg.local.state_db, {"cmd": "status"}) or {}).get("status")
        if live is None:
            raise FlockerError("the daemon stopped while discarding %s; see its log and "
                               "'status'" % args.name)
        d = live.get("discard") or {}
        if d.get("dataset") == args.name and d.get("state") == "done":
            print("destroyed %s (by the running daemon)" % args.name)
            return EXIT_OK
        if d.get("dataset") == args.name and d.get("state") == "failed":
            raise FlockerError(d["error"])
        time.sleep(0.2)
    raise ActionError("the daemon did not finish discarding %s within 300 s; see 'status' "
                      "and its log" % args.name)


def cmd_copy_preserved(args, cfg_path: str) -> int:
    cfg = config_of(cfg_path, args.node)
    with StateStore.open(cfg.local.state_db) as store:
        copy, snap, where = copy_preserved(Context(cfg, store, Zfs()), args.name,
                                           args.mountpoint)
    print("made %s, a writable copy of %s@%s, %s %s.\n"
          "Look into it there (a database: start a second instance on it, on another port; "
          "a volume: attach the device to a virtual machine of its own); the preserved "
          "dataset does not change. When done: zfs destroy %s"
          % (copy, args.name, snap, "mounted at" if args.mountpoint else "its device:",
             where, copy))
    return EXIT_OK


def _add_copy_preserved(p) -> None:
    p.add_argument("name", metavar="DATASET",
                   help="a preserved dataset, as 'status' lists it")
    p.add_argument("--mountpoint", metavar="DIR",
                   help="where the copy is mounted (an absolute path); a file system "
                        "needs it, a volume (whose copy is a device) takes none")


def cmd_announce(args, cfg_path: str) -> int:
    cfg = config_of(cfg_path, args.node)
    answer = query_daemon(cfg.local.state_db, {"cmd": "announce"})
    if answer is None:
        raise FlockerError("no daemon runs on this node; the serving master's daemon "
                           "announces the service address")
    if not answer["ok"]:
        raise FlockerError(answer["error"])
    print("the daemon announces %s again" % cfg.service.service_address)
    return EXIT_OK


def _add_discard_preserved(p) -> None:
    p.add_argument("name", metavar="DATASET",
                   help="a preserved dataset, as 'status' lists it")
    p.add_argument("--yes", action="store_true",
                   help="do not ask for confirmation (for scripts)")


def _wait_for_role(cfg: Config, role: str, timeout: float) -> dict:
    """Poll the daemon until this node is `role` (and, for master, serving);
    returns its last status.  Prints the decisions on the way."""
    deadline = time.monotonic() + timeout
    said = None
    live = {}
    while time.monotonic() < deadline:
        answer = query_daemon(cfg.local.state_db, {"cmd": "status"})
        if answer is None:
            raise FlockerError("the daemon stopped while waiting; see its log")
        live = answer["status"]
        if live["role"] == role and (role == ROLE_SLAVE or live["serving"]):
            return live
        sw = live.get("switchover") or {}
        if sw.get("error"):
            raise ActionError(sw["error"])
        d = live.get("decision") or {}
        line = "%s: %s" % (d.get("kind"), d.get("reason"))
        if d and line != said:
            print("  ... %s" % line, flush=True)
            said = line
        time.sleep(0.2)
    d = live.get("decision") or {}
    raise ActionError("this node is not %s after %g s; the daemon's newest decision: %s: %s"
                      % (role, timeout, d.get("kind"), d.get("reason")))


def cmd_promote(args, cfg_path: str) -> int:
    cfg = config_of(cfg_path, args.node)
    if args.i_know_the_peer_is_alive and not args.force:
        raise FlockerError("--i-know-the-peer-is-alive goes with --force")
    answer = query_daemon(cfg.local.state_db, {
        "cmd": "promote", "force": args.force,
        "peer_alive_ok": args.i_know_the_peer_is_alive})
    if answer is None:
        if not args.force:
            raise FlockerError(
                "no daemon runs on this node: a planned switchover is coordinated by the "
                "daemons of both nodes; start it, or, if the master is dead, take over "
                "with 'promote --force'")
        with StateStore.open(cfg.local.state_db, lock_for="promote --force") as store:
            st = store.node_state()
            if st.role == ROLE_MASTER:
                raise FlockerError("this node is already master (epoch %d)" % st.epoch)
            peer = store.peer(cfg.peer.name) or {}
            zfs = Zfs()
            # every epoch this node has seen: its own, the peer's as last
            # heard, and those its replica carries (snapshot names, the role
            # marker): without a daemon the peer may never have been heard
            # (a cluster manager drives this node), and an epoch below the
            # old master's would make the new reign look older
            epoch = promotion_epoch(cfg.local_index, st.epoch, peer.get("epoch") or 0,
                                    epoch_in_listing(zfs.listing(cfg.local.dataset)))
            ctx = Context(cfg, store, zfs)
            fence_peer(ctx, st.epoch)    # as the daemon does: no takeover unfenced
            promote(ctx, epoch,
                    "the operator forced a takeover (promote --force, no daemon running)")
        print("%s is master now (epoch %d), its user system started; start the daemon "
              "to supervise it" % (cfg.local_name, epoch))
        return EXIT_OK
    if not answer["ok"]:
        raise FlockerError(answer["error"])
    print("%s: %s" % (cfg.local_name, "forced takeover requested" if args.force else
                      "asked %s for a planned switchover" % cfg.peer.name), flush=True)
    live = _wait_for_role(cfg, ROLE_MASTER, args.wait)
    print("%s is master now (epoch %d), serving" % (cfg.local_name, live["epoch"]))
    return EXIT_OK


def _add_promote(p) -> None:
    p.add_argument("--force", action="store_true",
                   help="take over without the master (it is dead): refused while the "
                        "peer is heard")
    p.add_argument("--i-know-the-peer-is-alive", action="store_true",
                   help="with --force: take over even though the peer is heard (makes two "
                        "masters until the older one yields)")
    p.add_argument("--wait", type=float, default=180.0, metavar="SECONDS",
                   help="how long to wait for the result (default 180)")


def cmd_demote(args, cfg_path: str) -> int:
    cfg = config_of(cfg_path, args.node)
    answer = query_daemon(cfg.local.state_db, {"cmd": "demote"})
    if answer is not None and args.even_if_unsent:
        raise FlockerError("--even-if-unsent is for a node without a daemon (a cluster "
                           "manager drives it); the daemon calls a failed switchover off")
    if answer is None:
        with StateStore.open(cfg.local.state_db, lock_for="demote") as store:
            st = store.node_state()
            if st.role != ROLE_MASTER:
                raise FlockerError("this node is not master (role %s)" % st.role)
            ctx = Context(cfg, store, Zfs())
            try:
                demote(ctx, st.epoch, "the operator ran demote (no daemon running)",
                       handover=True)
            except HandoverAborted as e:
                if not args.even_if_unsent:
                    raise ActionError(e.message) from None
                # what was written since the last snapshot stays here, in a
                # snapshot: 'compare' shows it, and 'rejoin' keeps it should
                # the peer be promoted over it
                listing = ctx.zfs.listing(cfg.local.dataset)
                if listing is not None:
                    _snapshot_if_changed(cfg, ctx.zfs, listing, st.epoch, wall_clock)
                demote(ctx, st.epoch, "demote --even-if-unsent: the final snapshot could "
                       "not be sent; this node keeps the newest data")
                print("%s is slave now, but the final snapshot could NOT be sent to %s (%s): "
                      "%s's replica lacks this node's newest data; do not promote it while "
                      "this node can be" % (cfg.local_name, cfg.peer.name, e.message,
                                            cfg.peer.name))
                return EXIT_OK
        print("%s is slave now: user system stopped, final snapshot sent to %s, the master "
              "role released (recorded in the state file). %s's daemon takes over as soon "
              "as this node's daemon runs and announces the release; or run 'promote "
              "--force' on %s" % (cfg.local_name, cfg.peer.name, cfg.peer.name,
                                  cfg.peer.name))
        return EXIT_OK
    if not answer["ok"]:
        raise FlockerError(answer["error"])
    print("%s: planned switchover to %s requested" % (cfg.local_name, cfg.peer.name),
          flush=True)
    live = _wait_for_role(cfg, ROLE_SLAVE, args.wait)
    print("%s is slave now (epoch %d); %s takes over" % (cfg.local_name, live["epoch"],
                                                        cfg.peer.name))
    return EXIT_OK


def _add_demote(p) -> None:
    p.add_argument("--wait", type=float, default=180.0, metavar="SECONDS",
                   help="how long to wait for the result (default 180)")
    p.add_argument("--even-if-unsent", action="store_true",
                   help="without a daemon: when the final snapshot cannot be sent, become "
                        "slave all the same (the data stays here; the peer's replica "
                        "lacks it): for a cluster manager, which must then not promote "
                        "the peer")


def cmd_compare(args, cfg_path: str) -> int:
    cfg = config_of(cfg_path, args.node)
    r = compare_replicas(cfg, Zfs(), peer_zfs(cfg))
    if args.json:
        print(json.dumps(r, indent=2, sort_keys=True))
        return EXIT_OK
    def newest(x):
        return x["snapshot"] if x else "no snapshot"
    if not r["reachable"]:
        print("%s holds %s; %s cannot be reached: %s" % (
            cfg.local_name, newest(r["local"]), cfg.peer.name, r["error"]))
    else:
        print("%s is %s: it holds %s, %s (%s, epoch %s) holds %s" % (
            cfg.local_name, r["relation"], newest(r["local"]), cfg.peer.name,
            r["peer_role"], r["peer_epoch"], newest(r["peer"])))
    return EXIT_OK


def _add_compare(p) -> None:
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: relation (same, ahead, behind, diverged, "
                        "no-replica, peer-empty; null when the peer cannot be reached), "
                        "reachable, error, local, peer, peer_role, peer_epoch")


def cmd_rejoin(args, cfg_path: str) -> int:
    cfg = config_of(cfg_path, args.node)
    if query_daemon(cfg.local.state_db, {"cmd": "ping"}) is not None:
        raise FlockerError("a daemon runs on this node: it rejoins by itself")
    with StateStore.open(cfg.local.state_db, lock_for="rejoin") as store:
        print(rejoin(Context(cfg, store, Zfs()), peer_zfs(cfg)))
    return EXIT_OK


def cmd_resolve(args, cfg_path: str) -> int:
    cfg = config_of(cfg_path, args.node)
    if args.dry_run:
        live = (query_daemon(cfg.local.state_db, {"cmd": "status"}) or {}).get("status")
        with StateStore.open(cfg.local.state_db) as store:
            v, _ = resolve_divergence(Context(cfg, store, Zfs()), peer_zfs(cfg),
                                      threading.Event(), dry_run=True,
                                      serving=bool(live and live.get("serving")))
        print("verdict (dry run, nothing changed): %s%s" % (
            v.reason, "" if v.status == VERDICT_RESOLVED else keep_by_hand_hint(cfg, v)
            if v.kept_by_hand else " -> an operator decides: 'resolve --winner NODE'"))
        return EXIT_OK
    if args.winner is None:
        raise FlockerError("say which node's data continues: 'resolve --winner NODE' "
                           "(see 'resolve --dry-run' and 'status' first)")
    answer = query_daemon(cfg.local.state_db, {"cmd": "resolve", "winner": args.winner})
    if answer is None:
        raise FlockerError("no daemon runs on this node: the resolution is carried out by "
                           "the daemons of both nodes; start them")
    if not answer["ok"]:
        raise FlockerError(answer["error"])
    print("%s: %s's data continues; the other node keeps its own as a preserved dataset"
          % (cfg.local_name, args.winner), flush=True)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        live = (query_daemon(cfg.local.state_db, {"cmd": "status"}) or {}).get("status")
        if live is None:
            raise FlockerError("the daemon stopped while waiting; see its log")
        div = live.get("divergence") or {}
        if div.get("winner_choice") is None and not div.get("resolving") and \
                not div.get("unresolved"):
            print("resolved: this node is %s (epoch %d)" % (live["role"], live["epoch"]))
            return EXIT_OK
        time.sleep(0.3)
    raise ActionError("not resolved within %g s; see 'status' and the log" % args.wait)


def _add_resolve(p) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="show the verdict the current facts give; change nothing")
    p.add_argument("--winner", metavar="NODE",
                   help="the node whose data continues (the other keeps its own as a "
                        "preserved dataset)")
    p.add_argument("--wait", type=float, default=180.0, metavar="SECONDS",
                   help="how long to wait for the result (default 180)")


def cmd_daemon(args, cfg_path: str) -> int:
    cfg = config_of(cfg_path, args.node)
    for name in ("zfs", "zpool"):
        zfs_program(name)       # found now, or a clear error now
    root = logging.getLogger()
    if args.verbose == 0:
        root.setLevel(logging.INFO)
    if not os.environ.get("JOURNAL_STREAM"):
        # not under systemd's journal, which stamps lines itself
        for handler in root.handlers:
            if not isinstance(handler, logging.StreamHandler):
                continue     # syslog stamps its lines itself
            handler.setFormatter(logging.Formatter(
                "%(asctime)s %(name)s[%(process)d]: %(levelname)s: %(message)s"))
    return Daemon(cfg, pidfile=args.pidfile).run()


def _add_daemon(p) -> None:
    p.add_argument("--pidfile", metavar="FILE",
                   help="write the daemon's pid to FILE (removed at a clean stop)")


def parse_witness_listen(text: str) -> Tuple[str, int]:
    """--listen ADDRESS:PORT (IPv6: [ADDRESS]:PORT), or :PORT / ADDRESS alone."""
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\](?::(\d+))?$", text) or \
        re.match(r"^([^:\s]*)(?::(\d+))?$", text)
    try:
        if not m:
            raise ValueError
        host = m.group(1) or "0.0.0.0"
        ipaddress.ip_address(host)
        port = int(m.group(2) or WITNESS_PORT)
        if not 1 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError("--listen %s: expected ADDRESS:PORT, e.g. 192.0.2.254:%d or "
                          "[2001:db8::1]:%d (an IP address of this machine)"
                          % (text, WITNESS_PORT, WITNESS_PORT)) from None
    return host, port


def parse_witness_cluster(text: str) -> Tuple[str, Dict[bytes, Tuple[str, bytes]]]:
    """--cluster NAME=SECRET_FILE[,PREVIOUS_SECRET_FILE]: the cluster's name
    (its [cluster] name) and the keys its nodes sign with."""
    name, sep, files = text.partition("=")
    paths = [x.strip() for x in files.split(",")] if sep else []
    if not _NAME_RE.match(name) or not 1 <= len(paths) <= 2 or \
            not all(x.startswith("/") for x in paths):
        raise ConfigError("--cluster %s: expected NAME=SECRET_FILE or "
                          "NAME=SECRET_FILE,PREVIOUS_SECRET_FILE (the cluster's [cluster] name "
                          "and absolute paths of copies of its secret_file)" % text)
    keys = [read_secret(x, "witness", "--cluster %s" % name, "command line") for x in paths]
    return name, wire_keys(*keys)


def cmd_witness(args, cfg_path: str) -> int:
    listen = parse_witness_listen(args.listen)
    clusters = {}   # type: Dict[str, Dict[bytes, Tuple[str, bytes]]]
    for text in args.cluster or []:
        name, keys = parse_witness_cluster(text)
        if name in clusters:
            raise ConfigError("--cluster %s: the cluster %s is named twice" % (text, name))
        clusters[name] = keys
    if not clusters:
        raise ConfigError("witness: expected at least one --cluster NAME=SECRET_FILE")
    if not 1.0 <= args.max_lease <= WITNESS_MAX_LEASE:
        raise ConfigError("--max-lease %g: expected seconds from 1 to %g (no node's "
                          "witness_lease may be longer)" % (args.max_lease, WITNESS_MAX_LEASE))
    state = os.path.abspath(args.state)
    if not os.path.isdir(os.path.dirname(state)):
        raise ConfigError("--state %s: the directory %s does not exist; create it (e.g. "
                          "mkdir -p %s)" % (args.state, os.path.dirname(state),
                                            os.path.dirname(state)))
    root = logging.getLogger()
    if args.verbose == 0:
        root.setLevel(logging.INFO)
    if not os.environ.get("JOURNAL_STREAM"):
        for handler in root.handlers:
            if isinstance(handler, logging.StreamHandler) and \
                    not isinstance(handler, logging.NullHandler):
                handler.setFormatter(logging.Formatter(
                    "%(asctime)s %(name)s[%(process)d]: %(levelname)s: %(message)s"))
    server = WitnessServer(listen, clusters, state, args.max_lease)

    def on_stop(signum, frame):
        server.stop = True
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    try:
        try:
            server.open(time.monotonic())
        except OSError as e:
            raise FlockerError("cannot listen on UDP %s:%d: %s" % (
                listen[0], listen[1], e.strerror or e)) from None
        if args.pidfile:
            write_atomically(args.pidfile, "%d\n" % os.getpid())
        log.info("witness listening on UDP %s port %d for cluster(s) %s; leases up to %g s; "
                 "state in %s", listen[0], listen[1], ", ".join(sorted(clusters)),
                 args.max_lease, state)
        server.serve()
        log.info("witness stopped")
        return EXIT_OK
    finally:
        server.close()
        if args.pidfile:
            with contextlib.suppress(OSError):
                os.unlink(args.pidfile)


def _add_witness(p) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("Run it on a third machine that both nodes reach (not on either node). "
                "It needs no configuration file: --config is not read.\n"
                "Nodes use it with 'witness = ADDRESS:PORT' in [cluster].")
    p.add_argument("--listen", default="0.0.0.0:%d" % WITNESS_PORT, metavar="ADDRESS:PORT",
                   help="UDP address to answer on (default: %(default)s)")
    p.add_argument("--cluster", action="append", metavar="NAME=SECRET_FILE[,PREVIOUS]",
                   help="a cluster this witness serves: its name and a copy of its "
                        "secret_file (mode 0600), during a key change also the previous "
                        "one; repeat for more clusters")
    p.add_argument("--state", default=WITNESS_STATE, metavar="FILE",
                   help="where the witness records who holds each lease (default: "
                        "%(default)s)")
    p.add_argument("--max-lease", type=float, default=WITNESS_MAX_LEASE_DEFAULT,
                   metavar="SECONDS",
                   help="the longest lease lent; a witness that starts without its state "
                        "file lends nothing for this long (default: %(default)g)")
    p.add_argument("--pidfile", metavar="FILE",
                   help="write the witness's pid to FILE (removed at a clean stop)")


GATE_HELP = """\
The forced command of the peer's key in root's authorized_keys:

  restrict,command="/usr/local/sbin/flocker_failover.py --config /etc/flocker/flocker.conf ssh-gate" ssh-ed25519 AAAA... flocker@PEER

sshd passes the request in SSH_ORIGINAL_COMMAND; no shell ever reads it.
It is run only when it is exactly one of these forms (D: the dataset of
this node; -r and D/CHILD only with recursive = yes):

  features                        usage text of zfs and zfs get
  session                         requests one per line, answers framed
  zfs get -H -p -o FIELDS PROPS [-d 1 | -r] D
  zfs list -H -o name D           (or a parent of D)
  zfs recv -u [-s] D              (the stream on standard input; a package
                                  stream, send -R or -p, only with recursive = yes)
  zfs recv -A D[/CHILD]
  zfs hold [-r] flocker D@SNAP
  zfs release [-r] flocker D@SNAP
  zfs destroy [-r] D@flocker-...[,flocker-...]   replication snapshots only
  zfs set readonly=on D
  zfs set 'flocker:role=NODE ROLE EPOCH' D
  flocker status --json

Everything else (other commands, other datasets, other options, any of
; | & $ ` < > ( ) \\ " newline) is refused with exit status 9 and a
message to the ssh client, and logged here to syslog (--syslog-socket,
default /dev/log).  Try a request by hand:
  SSH_ORIGINAL_COMMAND='zfs list -H -o name tank/shop' flocker_failover.py ssh-gate
"""


def cmd_ssh_gate(args, cfg_path: str) -> int:
    text = os.environ.get("SSH_ORIGINAL_COMMAND")
    if text is None and not os.environ.get("SSH_CONNECTION"):
        print("%s: error: ssh-gate serves the peer's requests as the forced command of "
              "its key in root's authorized_keys (see 'ssh-gate --help'); sshd passes "
              "the request in SSH_ORIGINAL_COMMAND, which is not set here. To try a "
              "request by hand: SSH_ORIGINAL_COMMAND='zfs list -H -o name DATASET' %s "
              "ssh-gate" % (PROG, sys.argv[0]), file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg = config_of(cfg_path, args.node)
        zfs_program()
    except FlockerError as e:
        log.error("ssh-gate: cannot serve the peer: %s", e.message)
        sys.stderr.write("%s ssh-gate: cannot serve requests: %s\n" % (PROG, e.message))
        return e.exit_code
    gate = Gate(cfg, os.path.abspath(__file__), logged=_LOGGING["syslog"])
    return gate.serve(text or "")


def _add_ssh_gate(p) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = GATE_HELP


def cmd_sync(args, cfg_path: str) -> int:
    cfg = config_of(cfg_path, args.node)
    progress = None
    if sys.stderr.isatty():        # a progress line for a person; nothing for cron
        def draw(view):
            sys.stderr.write("\r\033[K" + format_progress(view))
            sys.stderr.flush()
        progress = TransferProgress(draw)
    try:
        with StateStore.open(cfg.local.state_db, lock_for="sync") as store:
            result = replicate_once(cfg, store, Zfs(), peer_zfs(cfg), progress=progress)
    finally:
        if progress is not None and progress._drawn:
            sys.stderr.write("\n")
    if args.json:
        print(json.dumps(asdict(result), indent=2, sort_keys=True))
    else:
        print(result.message)
        for where, names in ((cfg.local.name, result.pruned_local),
                             (cfg.peer.name, result.pruned_peer)):
            if names:
                print("retention removed %d snapshot(s) on %s: %s"
                      % (len(names), where, ", ".join(names)))
    return EXIT_OK


def _add_sync(p) -> None:
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object")


def _add_genkey(p) -> None:
    p.add_argument("--output", "-o", metavar="FILE",
                   help="write the key to FILE (created with mode 0600, never "
                        "overwritten) instead of standard output")


def _add_init(p) -> None:
    p.add_argument("--role", required=True, choices=ROLES,
                   help="master on the node that runs the user system now, slave on "
                        "the other")
    p.add_argument("--force", action="store_true",
                   help="start over on a node that already has history; the old "
                        "state file is kept as a backup beside it")


def _add_status(p) -> None:
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (keys documented in README)")


# name, handler, argument setup, one-line help: one row per subcommand.
COMMANDS = (
    ("init", cmd_init, _add_init,
     "prepare this node: state file, dataset check, initial role"),
    ("sync", cmd_sync, _add_sync,
     "run one replication cycle to the peer now (master only; safe from cron)"),
    ("status", cmd_status, _add_status,
     "show role, epoch, peer and replication state"),
    ("check", cmd_check, _add_check,
     "one line for monitoring (Nagios conventions): exit 0 OK, 1 WARNING, 2 CRITICAL, "
     "3 UNKNOWN"),
    ("history", cmd_history, _add_history,
     "show the event log of this node, newest last"),
    ("promote", cmd_promote, _add_promote,
     "on the slave: planned switchover (the master stops, sends its last snapshot, "
     "demotes; then this node promotes); --force takes over from a dead master"),
    ("demote", cmd_demote, _add_demote,
     "on the master: planned switchover to the slave (the same, from this side)"),
    ("compare", cmd_compare, _add_compare,
     "which replica is newer, this node's or the peer's (by snapshot GUIDs; for a cluster "
     "manager's promotion scores)"),
    ("rejoin", cmd_rejoin, lambda p: None,
     "without a daemon, the peer master (a cluster manager's decision): become its slave, "
     "keeping what this node wrote that the peer lacks as a preserved dataset"),
    ("resolve", cmd_resolve, _add_resolve,
     "a split brain: show the verdict (--dry-run) or choose the winner (--winner NODE)"),
    ("discard-preserved", cmd_discard_preserved, _add_discard_preserved,
     "destroy divergent data kept by an earlier split-brain resolution"),
    ("announce", cmd_announce, lambda p: None,
     "on the serving master: announce the service address again (gratuitous ARP, "
     "IPv6 neighbour advertisements), e.g. after a switch was replaced"),
    ("copy-preserved", cmd_copy_preserved, _add_copy_preserved,
     "a writable copy of divergent data kept by a split-brain resolution, to look into "
     "(e.g. a second database instance); the kept data does not change"),
    ("daemon", cmd_daemon, _add_daemon,
     "run in the foreground: heartbeats, liveness, control socket (SIGTERM stops, "
     "SIGHUP reloads the configuration)"),
    ("ssh-gate", cmd_ssh_gate, _add_ssh_gate,
     "serve the peer's ssh requests, only those replication needs: the forced command "
     "of its key in authorized_keys"),
    ("witness", cmd_witness, _add_witness,
     "on a third machine: lend a lease to one node of a cluster at a time, so that a "
     "cut between the nodes never leaves two masters (see README, Failover)"),
    ("config-check", cmd_config_check, lambda p: None,
     "validate the configuration and print it, secrets masked"),
    ("genkey", cmd_genkey, _add_genkey,
     "print a fresh random secret key for secret_file"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flocker_failover.py",
        description="High availability for one user system on two hosts with ZFS "
                    "replication and automatic failover.")
    parser.add_argument("--version", action="version", version="%s %s" % (PROG, VERSION))
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG, metavar="PATH",
                        help="configuration file (default: %(default)s)")
    parser.add_argument("--node", metavar="NAME",
                        help="which node this host is (default: found from this "
                             "host's addresses, then its host name)")
    parser.add_argument("--verbose", "-v", action="count", default=0,
                        help="more log output (repeat for debug)")
    parser.add_argument("--syslog", action="store_true",
                        help="log to syslog (facility daemon) instead of stderr, for "
                             "hosts without journald; stderr with a warning when there "
                             "is no syslog socket")
    parser.add_argument("--syslog-socket", default=SYSLOG_SOCKET, metavar="PATH",
                        help="the syslog socket (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, handler, setup, helptext in COMMANDS:
        p = sub.add_parser(name, help=helptext, description=helptext)
        setup(p)
        p.set_defaults(handler=handler)
    return parser


SYSLOG_SOCKET = "/dev/log"
_LOGGING = {"syslog": False}    # where setup_logging sent the log


def syslog_handler(path: str) -> Optional[logging.Handler]:
    """A handler for the syslog socket at path (facility daemon), or None
    when nothing listens there."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):   # as SysLogHandler tries
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(path)
                break
            except OSError:
                pass
    else:
        return None      # (from Python 3.11 on, the handler would not say)
    import logging.handlers     # only here: it takes a while to import
    try:
        handler = logging.handlers.SysLogHandler(
            address=path, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    except OSError:
        return None
    handler.ident = "%s[%d]: " % (PROG, os.getpid())
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    return handler


def setup_logging(verbose: int, to_syslog: bool, socket_path: str,
                  gate: bool = False) -> None:
    """The log goes to stderr (levels shown), or with to_syslog to syslog.
    The ssh gate always logs to syslog: its stderr belongs to the ssh client;
    without a syslog socket its log is dropped (refusals still reach the
    client)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.WARNING - 10 * min(verbose, 2))
    handler = syslog_handler(socket_path) if (to_syslog or gate) else None
    _LOGGING["syslog"] = handler is not None
    if handler is None and gate:
        handler = logging.NullHandler()
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    if gate:
        logging.raiseExceptions = False      # never a traceback to the ssh client
    elif to_syslog and not _LOGGING["syslog"]:
        log.warning("--syslog: no syslog socket at %s (is a syslog daemon running? "
                    "--syslog-socket names another); logging to stderr", socket_path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.syslog, args.syslog_socket,
                  gate=args.command == "ssh-gate")
    try:
        return args.handler(args, args.config)
    except FlockerError as e:
        print("%s: error: %s" % (PROG, e.message), file=sys.stderr)
        if _LOGGING["syslog"]:
            log.error("%s: %s", args.command, e.message)
        return e.exit_code
    except KeyboardInterrupt:
        print("%s: interrupted" % PROG, file=sys.stderr)
        return 130


# -- run as a program: the code compiled once ---------------------------------
#
# Run as the script (python3 flocker_failover.py), CPython compiles every
# line of this file each time: about 0.1 s of CPU here, as much as all the
# rest of a 'sync' with nothing to send, and paid as well by each ssh gate
# the peer starts.  Run as a program (by its path: the gate's forced
# command, cron, a person), sh reads the first lines of this file and runs
# Python on the function below alone (found by its first and last line, a
# few lines to compile), which runs the code of this file compiled once per
# content and interpreter.  It is kept in FLOCKER_CODE_CACHE (default
# /var/cache/flocker-failover for root, else ~/.cache/flocker-failover;
# empty: nowhere) under the SHA-256 of the file's bytes with sys.version,
# the implementation's cache tag and the optimization level: any change of
# the file (one that kept its size and mtime too, as a copy by cp -p may) or
# of the interpreter is another name.  A file or directory there not owned
# by this user, or writable by others, is never read; where nothing can be
# read or written the program is compiled, as by the script.  The three
# newest are kept.  The daemon so started runs as the module, as
# exec_daemon_as_module would make it (below).

def _cached_main() -> None:
    """Run this program's main() from its code compiled once (see above)."""
    import hashlib
    import marshal
    import os
    import sys
    import types
    path = os.path.abspath(sys.argv.pop(1))
    with open(path, "rb") as f:
        source = f.read()
    cache = os.environ.get("FLOCKER_CODE_CACHE")
    if cache is None:
        cache = ("/var/cache/flocker-failover" if os.geteuid() == 0 else os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
            "flocker-failover"))
    tag = "%s\0%s\0%d\0" % (sys.version, sys.implementation.cache_tag, sys.flags.optimize)
    name = os.path.join(cache, hashlib.sha256(tag.encode() + source).hexdigest()[:40] + ".code")

    def ours(st):
        return st.st_uid == os.geteuid() and not st.st_mode & 0o022

    code = None
    try:
        with open(os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as f:
            if ours(os.fstat(f.fileno())) and ours(os.stat(cache)):
                code = marshal.load(f)
    except (OSError, EOFError, ValueError, TypeError):
        pass
    if not isinstance(code, types.CodeType):
        code = compile(source, path, "exec", dont_inherit=True)
        try:
            os.makedirs(cache, mode=0o700, exist_ok=True)
            if cache and ours(os.stat(cache)):
                tmp = "%s.%d.tmp" % (name, os.getpid())
                with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                    marshal.dump(code, f)
                os.replace(tmp, name)
                kept = sorted((e.stat().st_mtime, e.path) for e in os.scandir(cache)
                              if e.name.endswith(".code"))
                for _, old in kept[:-3]:
                    os.unlink(old)
        except OSError:
            pass
    del source
    module = types.ModuleType("flocker_failover")
    module.__file__ = sys.argv[0] = path
    sys.modules[module.__name__] = module
    exec(code, module.__dict__)
    del code
    sys.exit(module.main())
# end of _cached_main


# The daemon (and the witness) runs as a module, not as the script (the same
# process and pid): CPython keeps the parse tree of the script it runs until
# the script's last line returns, which a daemon's never does; for this file
# that is about
# 20 MB, 40 % of the daemon's memory.  So a daemon hands the code compiled
# for this run, through an anonymous file, to this program exec'd again as
# "python3 -c _AS_MODULE PATH ARGS...", which runs it as the module
# flocker_failover (nothing is compiled twice) with no parse tree left.
_CODE_FD = "FLOCKER_FAILOVER_CODE_FD"
_AS_MODULE = ("import marshal, os, sys, types; "
              "m = types.ModuleType('flocker_failover'); "
              "m.__file__ = sys.argv[0] = sys.argv.pop(1); "
              "sys.modules[m.__name__] = m; "
              "exec(marshal.load(open(int(os.environ.pop(%r)), 'rb')), m.__dict__); "
              "sys.exit(m.main())" % _CODE_FD)


def exec_daemon_as_module(code) -> None:
    """For the long-running commands (daemon, witness), exec this program
    again as a module, with `code` (this script's, compiled); returns
    where that cannot be done (no memfd_create, no sys.executable): the
    daemon then runs as the script, with the parse tree."""
    if not {"daemon", "witness"} & set(sys.argv[1:]) or not sys.executable \
            or not hasattr(os, "memfd_create"):
        return
    import marshal
    try:
        fd = os.memfd_create("flocker-failover-code", 0)     # inherited by the exec
        with open(fd, "wb", closefd=False) as f:
            marshal.dump(code, f)
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        return
    # the interpreter's own options (-u, -X ...) again (known from 3.10 on)
    orig = getattr(sys, "orig_argv", None) or []
    options = orig[1:len(orig) - len(sys.argv)] if len(orig) > len(sys.argv) else []
    os.execve(sys.executable, [sys.executable] + options + [
        "-c", _AS_MODULE, os.path.abspath(__file__)] + sys.argv[1:],
        dict(os.environ, **{_CODE_FD: str(fd)}))


if __name__ == "__main__":
    if hasattr(sys, "_getframe"):
        exec_daemon_as_module(sys._getframe().f_code)
    sys.exit(main())
