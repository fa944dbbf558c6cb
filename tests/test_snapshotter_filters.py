"""containerd's filter language (fastpull.snapshotter.filters): containerd's own table
(pkg/filters/filter_test.go) over its corpus, the strings containerd sends, and properties: any
quoted string reads back as itself, generated filters parse to what generated them, and junk
fails only with SnapshotInvalid."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastpull.errors import SnapshotInvalid
from fastpull.snapshotter.filters import Filter, Selector, parse_all, quote
from fastpull.snapshotter.metadata import Info, Kind, fields

# containerd's corpus: name, other, labels
CORPUS = [
    ("foo", "", {"foo": "true"}),
    ("bar", "", {}),
    ("foo", "", {"foo": "present", "more complex label": "present"}),
    ("bar", "", {"bar": "true"}),
    ("fooer", "", {'more complex label with \\ and "': "present"}),
    ("fooer", "", {'more complex label with \\ and ".post': "present"}),
    ("baz", "too complex, yo", {}),
    ("bazo", "abc", {}),
    ("compound", "", {"foo": "omg_asdf.asdf-qwer"}),
]


def _lookup(entry):
    name, other, labels = entry

    def lookup(path):
        if path[0] == "name":
            return name or None
        if path[0] == "other":
            return other or None
        if path[0] == "labels":
            return labels.get(".".join(path[1:]))
        return None

    return lookup


MATCHES = [
    ("", range(9)),
    ("name", range(9)),
    ("labels.foo", [0, 2, 8]),
    ("labels.foo,name", [0, 2, 8]),
    ("labels.foo==true", [0]),
    ("labels.foo==omg_asdf.asdf-qwer", [8]),
    ("name==bar", [1, 3]),
    ("name!=bar", [0, 2, 4, 5, 6, 7, 8]),
    ("name==bar,labels.bar", [3]),
    ('other=="too complex, yo"', [6]),
    ("other~=[abc]+,name!=foo", [6, 7]),
    ("other~=/[abc]+/,name!=foo", [6, 7]),
    ("other~=/[abc]{1,2}/,name!=foo", [6, 7]),
    ('other~=/[abc]{0,1}"\\//,name!=foo', []),
    ("name==bar,labels.bar==true", [3]),
    ("name==bar,labels.bar==wrong", []),
    ('name==foo,labels."more complex label"', [2]),
    ('labels."more complex label with \\\\ and \\""==present', [4]),
    ('labels."more complex label with \\\\ and \\"".post==present', [5]),
    ("name == bar", [1, 3]),  # spaces before a token are skipped
    ("name==bar, labels.bar", [3]),
    ("other~=|a.c|", [7]),
]

PARSE_ERRORS = [
    "labels.|foo|==omg_asdf.asdf-qwer",  # only a regular expression takes /.../ and |...|
    'labels.?"more complex label with \\\\ and \\"".post==present',
    "name==foo,",
    "labels.",
    "image~=,id?=?fbaq",
    "labels.ns/key==value",
    "labels.key==/value",
    "name==/x/",
    "name==foo ",  # containerd's scanner: nothing may follow the last token, not even a space
    "name==.foo",
    "name=foo",
    "name===foo",
    "   ",
    "name==\x00",
    "name\ufffd",
    'name=="\\q"',
    'name=="\\400"',
    'name=="\\U00110000"',
    'name=="\\x4"',
    'name=="unterminated',
    'name=="new\nline"',
    "other~=[unclosed",  # refused here; containerd matches nothing
]


@pytest.mark.parametrize(("text", "expected"), MATCHES, ids=[m[0] or "empty" for m in MATCHES])
def test_containerd_filter_table(text, expected):
    matcher = parse_all([text])
    assert [i for i, entry in enumerate(CORPUS) if matcher.match(_lookup(entry))] == list(expected)


@pytest.mark.parametrize("text", PARSE_ERRORS)
def test_malformed_filters_are_invalid_arguments(text):
    with pytest.raises(SnapshotInvalid, match="invalid filter"):
        parse_all([text])


def test_several_filters_match_if_any_does_and_none_match_everything():
    assert parse_all([]).match(_lookup(CORPUS[1]))
    either = parse_all(["name==foo", "name==bar"])
    assert [e[0] for e in CORPUS if either.match(_lookup(e))] == ["foo", "bar", "foo", "bar"]
    assert parse_all(["name==nothing", ""]).match(_lookup(CORPUS[0]))  # an empty one matches all


def test_what_containerd_sends_with_an_unquoted_value_holding_a_colon():
    ref = "sha256:" + "ab" * 32
    parent = "k8s.io/3/sha256:" + "cd" * 32
    matcher = parse_all([f'labels."containerd.io/snapshot.ref"=={ref},parent=="{parent}"'])
    assert matcher == Filter(((Selector(("labels", "containerd.io/snapshot.ref"), "==", ref),
                               Selector(("parent",), "==", parent)),))
    info = Info("k8s.io/4/" + ref, parent, Kind.COMMITTED, {"containerd.io/snapshot.ref": ref}, 0.0, 0.0)
    assert matcher.match(fields(info))
    assert not matcher.match(fields(Info(info.name, "other", info.kind, info.labels, 0.0, 0.0)))


SNAPSHOT_FIELDS = [
    # (filter, matches the info below)
    ("kind==active", True),
    ("kind==committed", False),
    ("kind", True),
    ("name==k", True),
    ("name.anything==k", True),  # containerd's adaptor looks only at the first part
    ("parent==p", True),
    ('parent!=""', True),
    ("labels.a.b==dotted", True),
    ('labels."a.b"==dotted', True),
    ("labels.missing", False),
    ("labels.missing!=x", True),
    ("labels.missing~=^$", True),
    ("unknown", False),
    ("labels", False),
]


@pytest.mark.parametrize(("text", "matches"), SNAPSHOT_FIELDS)
def test_snapshot_fields(text, matches):
    info = Info("k", "p", Kind.ACTIVE, {"a.b": "dotted"}, 0.0, 0.0)
    assert parse_all([text]).match(fields(info)) is matches


def test_a_snapshot_without_labels_has_no_labels_field_and_an_unknown_kind_no_kind():
    info = Info("k", "", Kind.UNKNOWN, {}, 0.0, 0.0)
    assert not parse_all(["labels.x"]).match(fields(info))
    assert not parse_all(["kind"]).match(fields(info))
    assert parse_all(["parent"]).match(fields(info))  # present, empty


def test_escapes_are_go_strings():
    def value(text):
        return parse_all([f"labels.x=={text}"]).alternatives[0][0].value

    assert value(r'"\a\b\f\n\r\t\v\\\""') == "\a\b\f\n\r\t\v\\\""
    assert value(r'"\x41\101\u00e9\U0001F600"') == "AAé\U0001F600"
    assert value(r'"\ud800"') == "\ufffd"  # as Go's utf8.EncodeRune
    assert value(r'"\xff"') == "\udcff"  # a raw byte, never equal to a client's (UTF-8) string
    assert value("é") == "é"
    assert parse_all([r"labels.x~=/a\/b/"]).alternatives[0][0].value == "a/b"


# ---- properties ---------------------------------------------------------------------------------

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@given(key=texts, value=texts)
def test_quoted_strings_read_back(key, value):
    matcher = parse_all([f"labels.{quote(key)}=={quote(value)}"])
    assert matcher.alternatives == ((Selector(("labels", key), "==", value),),)
    assert matcher.match(lambda path: {("labels", key): value}.get(path))


bare_fields = st.from_regex(r"[A-Za-z0-9_]+", fullmatch=True)
bare_values = st.from_regex(r"[A-Za-z0-9_:@+-][A-Za-z0-9_:@+./=!~-]*", fullmatch=True)


@st.composite
def selectors(draw):
    parts = draw(st.lists(st.one_of(bare_fields, texts), min_size=1, max_size=4))
    fieldpath = tuple(parts)
    rendered = ".".join(p if bare_fields_match(p) else quote(p) for p in parts)
    op = draw(st.sampled_from(["", "==", "!=", "~="]))
    if op == "":
        return Selector(fieldpath), rendered
    if op == "~=":
        value = draw(st.sampled_from(["a+", "^x$", "[0-9]{2}", "", "."]))
        rendered_value = draw(st.sampled_from([quote(value), f"/{value}/", f"|{value}|"]))
    else:
        value = draw(st.one_of(bare_values, texts))
        rendered_value = value if bare_values_match(value) else quote(value)
    return Selector(fieldpath, op, value), rendered + op + rendered_value


def bare_fields_match(text):
    return bool(text) and all(c in string.ascii_letters + string.digits + "_" for c in text)


def bare_values_match(text):
    return bool(text) and text[0] not in "./|\"=!~," and all(
        c in string.ascii_letters + string.digits + "_:@+./=!~-" for c in text)


@given(st.lists(st.lists(selectors(), min_size=1, max_size=4), min_size=1, max_size=3))
def test_generated_filters_parse_to_what_generated_them(alternatives):
    rendered = [",".join(text for _, text in conjunction) for conjunction in alternatives]
    parsed = parse_all(rendered)
    assert parsed.alternatives == tuple(tuple(s for s, _ in conjunction) for conjunction in alternatives)


@given(st.lists(st.one_of(st.text(), st.text(alphabet='ab_.,="/|\\!~ \x00\n\ufffdxuU0479é')), max_size=5))
def test_junk_is_parsed_or_refused_as_invalid_never_anything_else(junk):
    try:
        matcher = parse_all(junk)
    except SnapshotInvalid:
        return
    matcher.match(lambda path: "value" if path[0] == "a" else None)  # and matching never fails
