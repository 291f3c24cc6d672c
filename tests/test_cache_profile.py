"""bench.tools.cache_profile reads callgrind_annotate's output of a cache simulation: the
totals per record and the functions ranked by last-level misses (canned output here; the
tool itself runs the worker under valgrind)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.tools import cache_profile as cp

CANNED = (Path(__file__).parent / "fixtures" / "cache_profile_annotate.txt").read_text()


def test_totals_and_functions_ranked_by_misses():
    totals, funcs = cp.parse_annotate(CANNED)
    assert totals["Ir"] == 787_340_217 and totals["DLmr"] == 1_886_892
    assert totals["DLmw"] == 2_337_535
    names = [n for _, n in funcs]
    # the table only: not the annotated source after it
    assert names == ["LZ4_compress_fast_continue", "_int_malloc", "__pyx_f_10aggregator_5_"
                     "jdoc__value_end", "0x00000000000284f0"]
    assert funcs[3][0]["Dw"] == 0 and funcs[3][0]["Dr"] == 10_000
    r = cp.report(totals, funcs, 10_000, top=2)
    assert r["per_record"]["Ir"] == pytest.approx(78_734.0217)
    assert r["per_record"]["LL misses"] == pytest.approx((1_886_892 + 2_337_535) / 10_000)
    assert [t["function"] for t in r["top"]] == ["_int_malloc", "LZ4_compress_fast_continue"]
    md = cp.markdown(r, "python -m bench.tools.cache_profile")
    assert "78,734 Ir" in md and "| `_int_malloc` | 22.8 | 1.1 | 21.7 | 3,064 |" in md


def test_output_without_a_cache_simulation_is_refused():
    no_cache = CANNED.replace(" 1,886,892 (100.0%) 2,337,535 (100.0%)", "")
    with pytest.raises(ValueError, match="cache simulation"):
        cp.parse_annotate(no_cache)


def test_missing_valgrind_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cp.shutil, "which", lambda tool: None)
    assert cp.main(["--events", "20", "--batch", "10"]) == 2
    assert "valgrind not found" in capsys.readouterr().err
