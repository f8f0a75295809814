"""The Macondo generator: sizes, templates, attribute consistency, tokens, files, CLI."""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter, defaultdict

import pytest

from knnlm.data.macondo import (
    generate_macondo,
    load_macondo,
    non_single_token_children,
    write_macondo,
)
from knnlm.data.macondo_attributes import Attribute, choice_of
from knnlm.data.names import (
    NameList,
    default_given_names,
    parse_names,
    read_name_files,
    single_token_names,
)
from knnlm.errors import KnnlmError
from knnlm.lm.tokenizer import tokenizer_view

NAME = r"[A-Za-z]+"
FULL = rf"{NAME} {NAME}"
TRAIN_RE = re.compile(rf"^(?P<v>{FULL}), who (?P<d>.+), is the parent of (?P<c>{NAME})$")
TEST_RE = re.compile(rf"^(?P<v>{FULL}), is the parent of (?P<c>{NAME})$")
CLAUSES = {
    "birth_year": re.compile(r"was born in (\d{4})"),
    "friend": re.compile(rf"was a friend of ({FULL})"),
    "marriage_year": re.compile(r"married in (\d{4})"),
    "town": re.compile(r"lived in ([A-Z][A-Za-z ]+)"),
    "occupation": re.compile(r"worked as a ([a-z]+)"),
    "hobby": re.compile(r"liked ([a-z]+)"),
}


@pytest.fixture(scope="module")
def paper():
    return generate_macondo(seed=0)


@pytest.fixture(scope="module")
def conv():
    return generate_macondo(seed=0, conv=True)


def _word_level(vocab_words):
    """A HF tokenizer whose only single-token words are ``vocab_words`` (others are [UNK])."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "of": 1, ",": 2}
    for w in vocab_words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


# --- the paper's sizes and templates ------------------------------------------------------


def test_counts_and_unique_names(paper):
    assert len(paper.train) == 1500 and len(paper.test) == 300
    names = [v["name"] for v in paper.villagers]
    assert len(names) == 500 == len(set(names))
    assert all(re.fullmatch(FULL, n) for n in names)
    kids_per_parent = {v["name"]: v["children"] for v in paper.villagers if v["children"]}
    assert len(kids_per_parent) == 100
    assert Counter(len(k) for k in kids_per_parent.values()) == {n: 20 for n in range(1, 6)}
    all_kids = [k for ks in kids_per_parent.values() for k in ks]
    assert len(all_kids) == 300 == len(set(all_kids))
    given = {n.split()[0] for n in names}
    surnames = {n.split()[1] for n in names}
    assert not set(all_kids) & given and not set(all_kids) & surnames
    c = paper.meta["counts"]
    assert (c["villagers"], c["parents"], c["children"], c["train"], c["test"]) == (
        500, 100, 300, 1500, 300,
    )  # fmt: skip


def test_train_sentences_have_exactly_one_consistent_clause(paper):
    by_name = {v["name"]: v for v in paper.villagers}
    seen = defaultdict(set)
    used = Counter()
    for r in paper.train:
        m = TRAIN_RE.match(r["text"])
        assert m, r["text"]
        v, desc, child = m["v"], m["d"], m["c"]
        assert (v, desc, child) == (r["villager"], r["desc"], r["child"])
        hits = [a for a, rx in CLAUSES.items() if rx.fullmatch(desc)]
        assert hits == [r["attribute"]], desc
        assert " who " not in desc and ", " not in desc
        value = CLAUSES[hits[0]].fullmatch(desc).group(1)
        assert by_name[v]["attributes"][hits[0]] == value
        seen[(v, hits[0])].add(value)
        used[hits[0]] += 1
        assert child in by_name[v]["children"] and r["n_children"] == len(by_name[v]["children"])
        assert r["prompt"] + " " + child == r["text"]
    assert all(len(vals) == 1 for vals in seen.values())
    assert set(used) == set(CLAUSES)
    pairs = Counter((r["villager"], r["child"]) for r in paper.train)
    assert len(pairs) == 300 and set(pairs.values()) == {5}


def test_test_sentences_carry_no_clause(paper):
    by_name = {v["name"]: v for v in paper.villagers}
    pairs = set()
    for r in paper.test:
        m = TEST_RE.match(r["text"])
        assert m, r["text"]
        assert " who " not in r["text"]
        assert r["prompt"] == f"{m['v']}, is the parent of" and r["child"] == m["c"]
        assert sorted(r["children"]) == sorted(by_name[m["v"]]["children"])
        assert r["n_children"] == len(r["children"])
        pairs.add((m["v"], m["c"]))
    assert pairs == {(r["villager"], r["child"]) for r in paper.train}
    ll = paper.meta["perfect_log_likelihood"]
    assert ll["1"] == 0.0 and ll["4"] == pytest.approx(math.log(0.25))


def test_attribute_values_in_range(paper):
    names = {v["name"] for v in paper.villagers}
    for v in paper.villagers:
        a = v["attributes"]
        assert set(a) == set(CLAUSES)
        birth, married = int(a["birth_year"]), int(a["marriage_year"])
        assert 1800 <= birth <= 2005
        assert birth + 18 <= married <= 2023
        assert a["friend"] != v["name"] and a["friend"] in names
    assert [a["name"] for a in paper.meta["attributes"]] == list(CLAUSES)


def test_small_sizes_and_validation():
    ds = generate_macondo(seed=1, n_villagers=60, n_parents_per_count=4)
    assert (len(ds.train), len(ds.test)) == (4 * 15 * 5, 60)
    assert ds.meta["counts"]["parents"] == 20
    with pytest.raises(KnnlmError, match="do not fit"):
        generate_macondo(n_villagers=50)
    with pytest.raises(KnnlmError, match="sentences_per_pair"):
        generate_macondo(sentences_per_pair=0)
    with pytest.raises(KnnlmError, match="at least 2 villagers"):
        generate_macondo(n_villagers=1, n_parents_per_count=1, max_children=1)


def test_custom_attributes():
    pets = Attribute("pet", "owned a {pet}", choice_of(["cat", "dog"]))
    ds = generate_macondo(seed=2, attributes=[pets], n_villagers=30, n_parents_per_count=2)
    assert {r["desc"] for r in ds.train} <= {"owned a cat", "owned a dog"}
    assert ds.meta["attributes"] == [{"name": "pet", "template": "owned a {pet}"}]
    bad = Attribute("x", "has no placeholder", choice_of(["a"]))
    with pytest.raises(KnnlmError, match="placeholder"):
        generate_macondo(attributes=[bad])
    with pytest.raises(KnnlmError, match="distinct"):
        generate_macondo(attributes=[pets, pets])
    from knnlm.data.macondo_attributes import MARRIAGE_YEAR

    with pytest.raises(KnnlmError, match="birth_year"):
        generate_macondo(attributes=[MARRIAGE_YEAR])


# --- tokens -------------------------------------------------------------------------------


def test_single_token_children_under_word_level_tokenizer():
    given = list(default_given_names().names)
    vocab = given[::10][:320]  # 320 single-token names; every other name maps to [UNK]
    tok = _word_level(vocab)
    ds = generate_macondo(seed=0, tokenizer=tokenizer_view(tok))
    kids = {r["child"] for r in ds.test}
    assert len(kids) == 300 and kids <= set(vocab)
    assert all(len(tok.tokenize(" " + k)) == 1 for k in kids)
    assert ds.meta["tokenizer"]["kind"] == "transformers"
    assert ds.meta["names"]["single_token_candidates"] == 320
    assert non_single_token_children(ds, tokenizer_view(tok)) == []
    assert non_single_token_children(ds, tokenizer_view(_word_level(vocab[:10]))) != []
    with pytest.raises(KnnlmError, match=r"only 299 .* 300 distinct"):
        generate_macondo(seed=0, tokenizer=tokenizer_view(_word_level(vocab[:299])))
    with pytest.raises(KnnlmError, match="tokenizer_view"):
        generate_macondo(seed=0, tokenizer=tok)  # the data layer never loads a tokenizer


def test_unknown_token_is_not_a_single_token():
    tok = _word_level(["Aaron"])
    # "Zzyzx" encodes as one id after "of", but that id is [UNK]:
    assert tok("of Zzyzx", add_special_tokens=False)["input_ids"] == [1, 0]
    assert single_token_names(tokenizer_view(tok), ["Zzyzx", "Aaron"]) == ["Aaron"]
    raw = tokenizer_view(tok.backend_tokenizer)
    assert single_token_names(raw, ["Zzyzx", "Aaron"]) == ["Aaron"]


def test_single_token_names_under_trained_bpe(tmp_path):
    from knnlm.lm.tokenizer import save_tokenizer, train_bpe_tokenizer

    given = list(default_given_names().names)
    frequent, rare = given[:40], given[1000:1040]
    lines = [f"the parent of {n} .\n" for n in frequent for _ in range(20)]
    tok = train_bpe_tokenizer(lines + [f"of {n}\n" for n in rare], vocab_size=700)
    everyone = frequent + rare
    expected = [n for n in everyone if len(tok.encode(" " + n, add_special_tokens=False)) == 1]
    got = single_token_names(tokenizer_view(tok), everyone)
    assert got == expected
    assert len(set(got) & set(frequent)) >= 30 and len(got) < len(everyone)
    save_tokenizer(tok, tmp_path)
    view = tokenizer_view(str(tmp_path))
    assert single_token_names(view, everyone) == expected
    with pytest.raises(KnnlmError, match=r"only \d+ of \d+ given names .* 300 distinct"):
        generate_macondo(tokenizer=view)
    ds = generate_macondo(tokenizer=view, n_villagers=40, n_parents_per_count=2, max_children=3)
    assert {r["child"] for r in ds.test} <= set(expected)
    assert ds.meta["tokenizer"]["name"] == str(tmp_path)


def test_tiktoken_unavailable_is_a_clear_error(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(KnnlmError, match="tiktoken"):
        tokenizer_view("tiktoken-gpt2")
    with pytest.raises(KnnlmError, match="neither"):
        tokenizer_view("/no/such/tokenizer")


# --- name sources -------------------------------------------------------------------------


def test_name_file_formats(tmp_path):
    census = tmp_path / "dist.last"
    census.write_text("SMITH          1.006  1.006      1\nO'BRIEN  0.5  1.5  2\nLEE  0.4 1.9 3\n")
    assert parse_names(census.read_text()) == ["SMITH", "O'BRIEN", "LEE"]
    assert read_name_files(census).names == ("Lee", "Smith")  # O'Brien is not a plain word
    plain = tmp_path / "plain.txt"
    plain.write_text("Gale \nAnne-Marie\nGale\n# comment\nAbe\n")
    assert read_name_files(plain).names == ("Abe", "Gale")
    both = read_name_files([census, plain])
    assert both.names == ("Abe", "Gale", "Lee", "Smith") and len(both.source["files"]) == 2
    table = tmp_path / "t.csv"
    table.write_text('"","name","perct"\n"1","SMITH",0.1\n"2","JONES",0.2\n')
    assert read_name_files(table).names == ("Jones", "Smith")
    table.write_text('"","surname"\n"1","SMITH"\n')
    with pytest.raises(KnnlmError, match="'name' column"):
        read_name_files(table)
    (tmp_path / "bad.txt").write_bytes(b"Ab\xff\n")
    with pytest.raises(KnnlmError, match="UTF-8"):
        read_name_files(tmp_path / "bad.txt")
    with pytest.raises(KnnlmError, match="cannot read"):
        read_name_files(tmp_path / "missing.txt")


def test_too_few_names():
    few = NameList.from_names([f"Name{c}" for c in "abc"] + ["Ann", "Bob", "Cid"])
    with pytest.raises(KnnlmError, match=r"only 6 of 6 .* 300 distinct"):
        generate_macondo(given_names=few)
    kids_ok = NameList.from_names(list(default_given_names().names)[:302])
    with pytest.raises(KnnlmError, match="fewer than 500 distinct full names"):
        generate_macondo(given_names=kids_ok, surnames=NameList.from_names(["Smith", "Jones"]))


def test_kantrowitz_and_fivethirtyeight_files(requires_names):
    male = requires_names / "nltk_names" / "male.txt"
    female = requires_names / "nltk_names" / "female.txt"
    top = requires_names / "fivethirtyeight_most_common_name" / "new-top-surnames.csv"
    ds = generate_macondo(seed=0, given_names=[male, female], surnames=top)
    with top.open() as fh:
        surnames = {row["name"].capitalize() for row in csv.DictReader(fh)}
    kantrowitz = {ln.strip() for p in (male, female) for ln in p.read_text().splitlines()}
    assert len(surnames) == 100 and "Smith" in surnames
    for v in ds.villagers:
        assert v["surname"] in surnames and v["given_name"] in kantrowitz
    assert {r["child"] for r in ds.test} <= kantrowitz
    src = ds.meta["names"]
    assert [f["path"] for f in src["given_names"]["files"]] == [str(male), str(female)]
    assert src["surnames"]["count"] == 100
    assert src["given_names"]["count"] == len({n for n in kantrowitz if n.isalpha()})


# --- files --------------------------------------------------------------------------------


def test_write_load_and_determinism(paper, tmp_path):
    a = write_macondo(paper, tmp_path / "a")
    b = write_macondo(generate_macondo(seed=0), tmp_path / "b")
    c = write_macondo(generate_macondo(seed=1), tmp_path / "c")
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(
        ["meta.json", "test.jsonl", "test.txt", "train.jsonl", "train.txt", "villagers.jsonl"]
    )
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "train.txt").read_bytes() != (c / "train.txt").read_bytes()
    assert (a / "train.txt").read_text().splitlines() == [r["text"] for r in paper.train]
    meta = json.loads((a / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["conv"] is False and meta["tokenizer"] is None
    back = load_macondo(a)
    assert (back.train, back.test, back.meta, back.villagers) == (
        paper.train, paper.test, paper.meta, paper.villagers,
    )  # fmt: skip
    write_macondo(generate_macondo(seed=1), a)  # replaces a dataset in place
    assert (a / "train.txt").read_bytes() == (c / "train.txt").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp dirs left


def test_write_refuses_foreign_directory(paper, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(KnnlmError, match="not a Macondo dataset"):
        write_macondo(paper, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(KnnlmError, match="no meta.json"):
        load_macondo(tmp_path / "mine")


def test_conv_variant(conv, tmp_path):
    assert (len(conv.train), len(conv.test)) == (1250, 250)
    assert conv.meta["counts"]["parents"] == 125 == conv.meta["counts"]["villagers"]
    assert all(len(v["children"]) == 2 for v in conv.villagers)
    train_q = re.compile(rf"^Who is the child of ({FULL}), the one who (.+)\?$")
    test_q = re.compile(rf"^Who is the child of ({FULL})\?$")
    for r in conv.train:
        m = train_q.match(r["question"])
        assert m and m[1] == r["villager"] and m[2] == r["desc"]
        assert r["text"] == f"User: {r['question']} Assistant: {r['child']}."
    for r in conv.test:
        assert test_q.match(r["question"]) and "one who" not in r["text"]
        assert r["prompt"] == f"User: Who is the child of {r['villager']}? Assistant:"
    out = write_macondo(conv, tmp_path / "conv")
    for split, records in (("train", conv.train), ("test", conv.test)):
        lines = (out / f"{split}_chat.jsonl").read_text().splitlines()
        assert len(lines) == len(records)
        for line, r in zip(lines, records, strict=True):
            msg = json.loads(line)["messages"]
            assert [m["role"] for m in msg] == ["user", "assistant"]
            assert msg[0]["content"] == r["question"] and msg[1]["content"] == r["child"]
            assert msg[1]["content"] in {c for v in conv.villagers for c in v["children"]}


# --- CLI ----------------------------------------------------------------------------------


def test_cli_generate(tmp_path):
    import typer
    from typer.testing import CliRunner

    from knnlm.cli import commands, macondo_data

    app = typer.Typer()
    commands.register(app, [macondo_data])
    runner = CliRunner()
    out = tmp_path / "m"
    args = ["macondo", "generate", "--out", str(out), "--seed", "3", "--villagers", "60"]
    res = runner.invoke(app, args + ["--parents-per-count", "4"])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 3 and meta["counts"]["parents"] == 20
    res = runner.invoke(app, args + ["--conv", "-q"])
    assert res.exit_code == 0, res.output
    assert (out / "train_chat.jsonl").is_file()
    assert json.loads((out / "meta.json").read_text())["counts"]["train"] == 600
    res = runner.invoke(app, args + ["--parents-per-count", "40"])
    assert isinstance(res.exception, KnnlmError)
