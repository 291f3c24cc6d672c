"""bench/tools/perf_leaves.py on a canned `perf script -F comm,pid,tid,ip,sym,dso` output
(no perf needed): samples parsed, the harness left out, leaves and kernel kinds counted."""

from __future__ import annotations

from bench.tools import perf_leaves as pl

SCRIPT = """\
python  100/100
\t    7f00 _PyObject_Malloc+0x12 (/usr/lib/libpython3.11.so.1.0)

python  200/200
\t    7f01 _PyObject_Malloc+0x30 (/usr/lib/libpython3.11.so.1.0)

python  200/200
\tffffffff81 clear_page_erms+0x9 ([kernel.kallsyms])
\tffffffff82 do_anonymous_page+0x1 ([kernel.kallsyms])
\tffffffff83 exc_page_fault+0x2 ([kernel.kallsyms])
\t    7f02 __memmove_avx_unaligned_erms+0x5 (/usr/lib/x86_64-linux-gnu/libc.so.6)

python  200/200
\tffffffff84 ext4_sync_file+0x1 ([kernel.kallsyms])
\tffffffff85 __do_sys_msync+0x1 ([kernel.kallsyms])
\t    7f03 msync+0x4 (/usr/lib/x86_64-linux-gnu/libc.so.6)

rdk:broker1  200/201
\t    7f04 LZ4_compress_fast_extState+0x1 (/opt/librdkafka.so.1)

python  300/300
\t    7f05 mdb_page_get+0x1 (/venv/lmdb/cpython.so)

python  200/200
\t    7f06 [unknown] (/venv/orjson.so)

swapper     0/0
\tffffffff86 pv_native_safe_halt+0x1 ([kernel.kallsyms])
"""


def test_samples_are_parsed_with_leaf_first():
    samples = pl.parse(SCRIPT.splitlines())
    assert len(samples) == 8
    s = samples[2]
    assert (s.comm, s.pid, s.tid) == ("python", 200, 200)
    assert s.leaf == ("clear_page_erms", "[kernel.kallsyms]")
    assert s.frames[-1] == ("__memmove_avx_unaligned_erms", "libc.so.6")
    assert samples[4].comm == "rdk:broker1" and samples[4].tid == 201


def test_kernel_samples_are_told_apart():
    kinds = [pl.kernel_kind(s) for s in pl.parse(SCRIPT.splitlines())]
    assert kinds[:4] == [None, None, "page fault: anonymous", "msync"]


def test_the_report_leaves_out_the_harness_and_counts_main_threads():
    text = pl.report(pl.parse(SCRIPT.splitlines()), None, 5)
    # python 200 is the busiest (the harness); 100 and 300 follow: those are reported
    assert "pids [100, 300]: 2 samples of the main threads" in text
    text = pl.report(pl.parse(SCRIPT.splitlines()), [200], 5)
    assert "pids [200]: 4 samples of the main threads; other threads: rdk:broker1 1" in text
    assert "25.0 %  _PyObject_Malloc  [libpython3.11.so.1.0]" in text
    assert "25.00 %  page fault: anonymous" in text and "25.00 %  msync" in text


def test_an_unreadable_file_is_one_line_and_exit_code_2(capsys, tmp_path):
    """With or without perf installed: one line on stderr, exit code 2, no traceback."""
    assert pl.main([str(tmp_path / "missing.data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("perf_leaves: ")
