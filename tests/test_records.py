"""The file's records (@record, section 1) against what dataclasses makes
of the same class: every record class of the program, built again with
dataclasses.make_dataclass from its fields, must construct, compare, hash,
print, refuse and copy alike."""

import dataclasses

import pytest

from conftest import ff

RECORDS = sorted((c for c in vars(ff).values()
                  if isinstance(c, type) and "_record_fields" in c.__dict__),
                 key=lambda c: c.__name__)


def twin(cls):
    """cls as dataclasses would make it."""
    specs = []
    for f in cls._record_fields:
        opts = {"repr": f.repr}
        if f.default_factory is not None:
            opts["default_factory"] = f.default_factory
        elif f.default is not ff._NO_DEFAULT:
            opts["default"] = f.default
        specs.append((f.name, object, dataclasses.field(**opts)))
    return dataclasses.make_dataclass(cls.__name__, specs, frozen=cls.__hash__ is not None)


def values(cls, salt=0):
    """A distinct hashable value for every field."""
    return ["%s-%d-%d" % (f.name, i, salt) for i, f in enumerate(cls._record_fields)]


def required(cls):
    return [f for f in cls._record_fields
            if f.default is ff._NO_DEFAULT and f.default_factory is None]


def test_the_program_has_its_records():
    names = {c.__name__ for c in RECORDS}
    assert {"Config", "Heartbeat", "Snap", "Listing", "ReplicationResult", "Boot"} <= names
    assert len(RECORDS) >= 20
    assert not hasattr(ff, "dataclasses")     # the import that costs every start


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_a_record_behaves_as_its_dataclass(cls):
    tw = twin(cls)
    vals = values(cls)
    ours, theirs = cls(*vals), tw(*vals)
    assert repr(ours) == repr(theirs)
    # by name, and equal field by field
    assert cls(**{f.name: v for f, v in zip(cls._record_fields, vals)}) == ours
    assert cls(*vals) == ours and not (cls(*vals) != ours)
    for i in range(len(vals)):
        other = list(vals)
        other[i] = "changed"
        assert cls(*other) != ours
        assert (tw(*other) != theirs) is True
    # never equal to anything of another class: its twin, a record class
    # with the same fields and values, a tuple of the values
    same_fields = ff.record(type(cls.__name__, (), {
        "__annotations__": {f.name: object for f in cls._record_fields}}),
        mutable=cls.__hash__ is None)
    assert ours != same_fields(*vals) and not (ours == same_fields(*vals))
    assert ours != theirs and ours != tuple(vals) and ours != object()
    frozen = cls.__hash__ is not None
    assert (tw.__hash__ is not None) == frozen
    if frozen:
        assert hash(ours) == hash(theirs) == hash(cls(*vals))
        for f in cls._record_fields:
            for attempt in (lambda: setattr(ours, f.name, 1), lambda: delattr(ours, f.name)):
                with pytest.raises(AttributeError) as ours_error:
                    attempt()
                assert isinstance(ours_error.value, ff.FrozenRecordError)
            with pytest.raises(AttributeError):
                setattr(theirs, f.name, 1)
        with pytest.raises(AttributeError):
            ours.not_a_field = 1
        assert getattr(ours, cls._record_fields[0].name) == vals[0]
    else:
        with pytest.raises(TypeError):
            hash(ours)
        setattr(ours, cls._record_fields[0].name, "moved")
        assert getattr(ours, cls._record_fields[0].name) == "moved"
    # defaults and factories, as dataclasses gives them
    req = [v for f, v in zip(cls._record_fields, vals) if f in required(cls)]
    a, b = cls(*req), tw(*req)
    for f in cls._record_fields:
        assert getattr(a, f.name) == getattr(b, f.name), f.name
        if f.default_factory is not None:
            assert getattr(a, f.name) is not getattr(cls(*req), f.name)
        assert (f.name in cls.__dict__) == (f.name in tw.__dict__), f.name
        if f.name in cls.__dict__:
            assert cls.__dict__[f.name] == tw.__dict__[f.name]
    # replace, as dataclasses.replace
    name = cls._record_fields[-1].name
    assert repr(ff.replace(ours if frozen else cls(*vals), **{name: "new"})) == repr(
        dataclasses.replace(theirs, **{name: "new"}))


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_a_record_refuses_what_its_dataclass_refuses(cls):
    tw = twin(cls)
    vals = values(cls)
    n = len(required(cls))
    calls = [
        ((vals + ["one too many"],), {}),
        ((vals,), {"not_a_field": 1}),
        ((vals[:1],), {cls._record_fields[0].name: 1}),
    ]
    if n:
        calls.append(((vals[:n - 1],), {}))
    for (args,), kwargs in calls:
        with pytest.raises(TypeError):
            tw(*args, **kwargs)
        with pytest.raises(TypeError):
            cls(*args, **kwargs)
    with pytest.raises(TypeError):
        ff.replace(cls(*vals), not_a_field=1)


def test_asdict_turns_records_within_records_into_dicts():
    snap = ff.Snap if "Snap" in vars(ff) else None
    s1 = snap(*values(snap, 1))
    s2 = snap(*values(snap, 2))
    listing_vals = values(ff.Listing)
    fields = [f.name for f in ff.Listing._record_fields]
    listing_vals[fields.index("snaps")] = [s1, s2]
    listing = ff.Listing(*listing_vals)
    got = ff.asdict(listing)
    tw_snap = twin(snap)
    want = dict(zip(fields, listing_vals))
    want["snaps"] = [dataclasses.asdict(tw_snap(*values(snap, 1))),
                     dataclasses.asdict(tw_snap(*values(snap, 2)))]
    assert got == want
    assert ff.asdict({"k": (s1,)}) == {"k": (dataclasses.asdict(tw_snap(*values(snap, 1))),)}


def test_a_field_without_a_default_after_one_with_is_refused_at_once():
    with pytest.raises(TypeError, match="'b' without a default"):
        @ff.record
        class Bad:
            a: int = 1
            b: int
    with pytest.raises(TypeError):
        @dataclasses.dataclass(frozen=True)
        class BadToo:
            a: int = 1
            b: int


def test_a_record_that_defines_what_a_record_makes_is_refused():
    with pytest.raises(TypeError, match="defines __repr__"):
        @ff.record
        class Own:
            a: int

            def __repr__(self):
                return "mine"


@pytest.mark.parametrize("make", [list, dict, set, lambda: ff.record(mutable=True)(
    type("Box", (), {"__annotations__": {}}))()],
    ids=["list", "dict", "set", "mutable record"])
def test_a_mutable_default_is_refused_as_dataclasses_refuses_it(make):
    # one object shared by every instance: dataclasses refuses a default
    # whose class is unhashable, and says to use default_factory
    default = make()
    with pytest.raises(ValueError, match="mutable default .* for field 'a' is not "
                                         "allowed: use default_factory"):
        ff.record(type("Bad", (), {"__annotations__": {"a": object}, "a": default}))
    with pytest.raises(ValueError, match="mutable default .* for field a is not "
                                         "allowed: use default_factory"):
        dataclasses.dataclass(type("BadToo", (), {"__annotations__": {"a": object},
                                                  "a": default}))
