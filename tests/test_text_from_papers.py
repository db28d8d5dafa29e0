"""Recipe text as users paste it (issue 13): characters from papers get a "did you mean"
hint, names follow Python's identifier rule (Unicode letters, NFKC-normalized), an unknown
name is one error however often it is used, and a --bind without '=' says so."""

from __future__ import annotations

import pytest

import tvlang
from tvlang.faces.cli import main


def error_of(text: str, **kwargs) -> tvlang.TvlangError:
    with pytest.raises(tvlang.TvlangError) as err:
        tvlang.compile(text, **kwargs)
    return err.value


@pytest.mark.parametrize("char,meant,name", [
    ("\u2212", "-", "minus sign"), ("\u2013", "-", "en dash"), ("\u00d7", "*", "multiplication sign"),
    ("\u00b7", "*", "middle dot"), ("\u00f7", "/", "division sign"), ("\u00a0", " ", "no-break space"),
])
def test_operators_from_papers_get_a_hint(char, meant, name):
    err = error_of(f"out = pre + 0.5*(ft {char} pre)" if meant in "- " else f"out = pre + 0.5{char}(ft - pre)")
    shown = repr(char) if not char.isprintable() else f"'{char}'"  # a no-break space is shown escaped
    assert err.message == f"unexpected character {shown}"
    assert err.notes == (f"note: did you mean {meant!r}? ({name}, as text copied from a paper or a word "
                         "processor has; recipes use plain ASCII operators and quotes)",)


def test_curly_quotes_get_a_hint():
    err = error_of('out = load(\u201cbase.safetensors\u201d)')
    assert err.message == "unexpected character '\u201c'"
    assert err.notes[0].startswith("note: did you mean '\"'? (left double quotation mark")


def test_zero_width_space_is_to_be_deleted():
    err = error_of("out = pre\u200b + 0.5*(ft - pre)")
    assert err.notes[0].startswith("note: delete it: (zero width space")


def test_unicode_names_work_and_are_nfkc_normalized():
    import torch

    plan = tvlang.compile("\u00e9t\u00e9 = ft - pr\u00e9\nout = pr\u00e9 + 0.5*\u00e9t\u00e9")
    got = plan.evaluate({"pr\u00e9": {"w": torch.zeros(2)}, "ft": {"w": torch.ones(2)}})
    assert got["w"].tolist() == [0.5, 0.5]
    # the ligature U+FB01 is 'fi' after NFKC, as in Python: one name, not two
    plan = tvlang.compile("out = \ufb01ne + 0.5*(ft - fine)")
    got = plan.evaluate({"fine": {"w": torch.zeros(2)}, "ft": {"w": torch.ones(2)}})
    assert got["w"].tolist() == [0.5, 0.5]


def test_a_name_cannot_start_with_a_digit_in_any_script():
    err = error_of("\u0663x = 1\nout = pre")  # ARABIC-INDIC DIGIT THREE
    assert err.message.startswith("unexpected character")


def test_an_unknown_name_is_one_error_however_often_it_is_used():
    err = error_of("out = pre + 0.5*(ft - pre) + 0*pre + 0*pre", sources={"ft": "model"})
    assert err.message == "unknown name 'pre'"
    assert len(err.errors) <= 1
    assert err.notes[-1] == "note: 'pre' is used 4 times; the first use is shown"
    assert (err.span.line, err.span.column) == (1, 7)


def test_bind_without_equals_says_so(capsys, tmp_path):
    code = main(["run", "-e", "pre + 0.5*(ft - pre)", "--bind", "pre", "base.safetensors",
                 "--bind", "ft=ft.safetensors", "-o", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == ("tvlang run: error: --bind pre: no '=' (write --bind pre=base.safetensors; "
                           "'base.safetensors' was read as the recipe file)")
    code = main(["check", "-e", "pre", "--bind", "pre"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == ("tvlang check: error: --bind expects NAME=PATH (or NAME=model, NAME=delta), "
                           "got 'pre' with no '=' (write --bind pre=...)")


def test_a_mistyped_path_suggests_the_near_name_and_names_the_binding(capsys, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    for name in ("pre", "ft"):
        save_file({"w": torch.zeros(2)}, str(tmp_path / f"{name}.safetensors"))
    monkeypatch.chdir(tmp_path)
    code = main(["run", "-e", "pre + 0.5*(ft - pre)", "--bind", "pre=pre.safetensors",
                 "--bind", "ft=ft.safetenosrs", "-o", "o.safetensors"])
    assert code == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: ft.safetenosrs: no such file or directory",
        "  note: did you mean 'ft.safetensors'?",
        "  note: 'ft' is bound to this path (--bind ft=..., or the bindings)",
    ]
    (tmp_path / "r.tv").write_text('pre = load("pre.safetensors")\nft = load("ft.safetensor")\n'
                                   "out = pre + 0.5*(ft - pre)\n")
    code = main(["run", "r.tv", "-o", "o.safetensors"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("r.tv:2:6: error: ft.safetensor: no such file or directory")
    assert "note: did you mean 'ft.safetensors'?" in err
