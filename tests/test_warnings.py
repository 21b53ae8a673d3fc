"""Known-harmless notices are filtered (diffgr2_trl._warnings): process-wide only by the ``diffgr2`` CLI, scoped to
the noisy calls everywhere else; anything else, and every error, still shows."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

from diffgr2_trl._warnings import KNOWN_LOG_NOTICES, filter_known_warnings, known_notices_silenced
from tests.helpers import REPO, launch_env

NOTICES = ["TRL currently supports vLLM versions", "Triton is installed, but doesn't include CPU backend",
           "Failed to load CPU gemm_4bit_forward", "will be initialized from a multivariate normal"]


def test_known_python_warnings_are_dropped_and_others_kept():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        filter_known_warnings(force=True)  # catch_warnings restored the filters; install them again inside
        warnings.warn("TRL currently supports vLLM versions from 0.22.0 to 0.31.0. You have version 0.32.0 installed.",
                      UserWarning, stacklevel=1)
        warnings.warn("TRL found a real problem", UserWarning, stacklevel=1)
        warnings.warn("TRL currently supports vLLM versions from 0.22.0", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["TRL found a real problem", "TRL currently supports vLLM versions from 0.22.0"]


@pytest.mark.parametrize("name,prefix", KNOWN_LOG_NOTICES)
def test_known_log_notices_are_dropped_and_others_kept(name, prefix):
    filter_known_warnings()
    logger = logging.getLogger(name)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        logger.warning(prefix + " ... (the notice)")
        logger.warning("something else went wrong")
        logger.error(prefix + " ... (as an error)")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r.getMessage() for r in records] == ["something else went wrong", prefix + " ... (as an error)"]


@pytest.mark.slow
def test_importing_the_trainers_and_converting_is_quiet():
    """A fresh interpreter imports the trainers and converts a model: none of the known notices reach stderr, while
    the same run with DIFFGR2_SHOW_ALL_WARNINGS=1 shows them (so the check is not vacuous), and the import leaves
    no filter of ours behind: the warning filters and the noisy loggers are as they were. The package is first
    imported inside ``catch_warnings``, as pytest's collection does."""
    code = ("import logging, warnings\n"
            "with warnings.catch_warnings():\n"
            "    import diffgr2_trl.modeling\n"
            "before = list(warnings.filters)\n"
            "import diffgr2_trl.trainers\n"
            "assert not [f for f in warnings.filters if f[1] is not None and f[1].pattern.startswith('TRL currently')]\n"
            "assert all(f in warnings.filters for f in before), 'importing the trainers dropped warning filters'\n"
            "assert not logging.getLogger('vllm.triton_utils.importing').filters\n"
            "assert not logging.getLogger('bitsandbytes.backends.cpu.ops').filters\n"
            "from diffgr2_trl.block_diffusion import convert_to_block_diffusion\n"
            "from diffgr2_trl.modeling import build_model\n"
            "from diffgr2_trl.synthetic import sort_tokenizer\n"
            "tok = sort_tokenizer()\n"
            "convert_to_block_diffusion(build_model('qwen3', tokenizer=tok), tok, block_size=4)\n")
    cmd = [sys.executable, "-W", "default", "-c", code]
    quiet = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stderr=subprocess.PIPE, text=True)
    loud = subprocess.Popen(cmd, cwd=REPO, env={**launch_env(), "DIFFGR2_SHOW_ALL_WARNINGS": "1"},
                            stderr=subprocess.PIPE, text=True)
    quiet_err, loud_err = quiet.communicate(timeout=300)[1], loud.communicate(timeout=300)[1]
    assert quiet.returncode == 0 and loud.returncode == 0, quiet_err[-2000:] + loud_err[-2000:]
    assert [n for n in NOTICES if n in quiet_err] == [], quiet_err[-3000:]
    shown = [n for n in NOTICES if n in loud_err]
    assert "will be initialized from a multivariate normal" in shown, loud_err[-3000:]
    print("notices shown without the filters:", shown)


def test_scoped_silencing_restores_filters_and_loggers():
    name, prefix = KNOWN_LOG_NOTICES[0]
    logger = logging.getLogger(name)
    filters_before, logger_filters_before = list(warnings.filters), list(logger.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with known_notices_silenced():
            warnings.warn("TRL currently supports vLLM versions from 0.22.0", UserWarning, stacklevel=1)
            assert not logger.filter(logging.LogRecord(name, logging.WARNING, "", 0, prefix + " x", None, None))
            warnings.filterwarnings("ignore", message="a library's own filter")  # e.g. installed by an import
        warnings.warn("TRL currently supports vLLM versions from 0.22.0", UserWarning, stacklevel=1)
        warnings.warn("a library's own filter", UserWarning, stacklevel=1)
        assert warnings.filters[0][1].pattern == "a library's own filter"  # kept; ours gone
        assert warnings.filters[1:] == [("always", None, Warning, None, 0), *filters_before]
    assert [str(w.message) for w in seen] == ["TRL currently supports vLLM versions from 0.22.0"]  # only outside
    assert warnings.filters == filters_before and logger.filters == logger_filters_before


def test_importing_the_package_installs_no_filters():
    """``import diffgr2_trl`` leaves the user's warning filters and loggers alone; the CLI installs ours. (The
    trainers subpackage, which imports TRL, is checked in the slow test above.)"""
    code = ("import logging, warnings\n"
            "def ours():\n"
            "    return [f for f in warnings.filters if f[1] is not None and f[1].pattern.startswith('TRL currently')]\n"
            "import diffgr2_trl, diffgr2_trl.modeling\n"
            "assert not ours(), 'importing the package installed our warning filters'\n"
            "assert not logging.getLogger('bitsandbytes.backends.cpu.ops').filters\n"
            "from diffgr2_trl.cli import console_main\n"
            "console_main(['convert', '--help'])\n"
            "assert ours() and logging.getLogger('bitsandbytes.backends.cpu.ops').filters\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=launch_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
