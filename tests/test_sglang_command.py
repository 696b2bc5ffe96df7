"""sglang_command: the launch_server argv for a base and its LoRA adapters, parsed by SGLang
0.5.23's own argument parser (prepare_server_args) and the dynamic linker's config check."""

from __future__ import annotations

import pytest
from test_codec_core import PS, _save_artifacts

from sgl_scd.sglang_ext.command import calibrated_adapters, sglang_command
from sgl_scd.sglang_ext.config import LINKER_CLASS, LINKER_MODULE, LinkerSettings

pytest.importorskip("sglang")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return _save_artifacts(tmp_path_factory.mktemp("cmd"), "tiny-lora-dir")[0]


def test_the_command_parses_with_sglangs_parser(encoder_dir):
    from sglang.srt.mem_cache.unified_cache.linker_config import UnifiedCacheLinkerConfig
    from sglang.srt.server_args import prepare_server_args

    assert calibrated_adapters(encoder_dir) == {"tiny-lora": str(encoder_dir.parent / "tiny-lora-dir")}
    cmd = sglang_command("HuggingFaceTB/SmolLM2-135M-Instruct", encoder_dir,
                         {"tiny-lora": "/peft/tiny-lora", "plain": "/peft/plain"}, store_url="redis://h:6379/0",
                         port=30001, extra_args=["--mem-fraction-static", "0.5"])
    assert cmd[:3] == ["python", "-m", "sglang.launch_server"]
    args = prepare_server_args(cmd[3:])
    assert args.model_path == "HuggingFaceTB/SmolLM2-135M-Instruct" and args.page_size == PS
    assert args.enable_unified_cache_external_linker and args.unified_cache_external_linker_backend == "dynamic"
    assert args.enable_lora and args.lora_paths == ["tiny-lora=/peft/tiny-lora", "plain=/peft/plain"]
    assert args.disable_prefill_cuda_graph and args.port == 30001 and args.mem_fraction_static == 0.5
    config = UnifiedCacheLinkerConfig.from_dict(args.unified_cache_external_linker_config)
    assert (config.linker, config.linker_module_path) == (LINKER_CLASS, LINKER_MODULE)
    settings = LinkerSettings.from_dict(config.linker_extra_config)
    # only adapters that are both served and calibrated reuse pages
    assert settings.adapters == {"tiny-lora": str(encoder_dir.parent / "tiny-lora-dir")}
    assert settings.store_url == "redis://h:6379/0" and settings.encoder == str(encoder_dir)


def test_flags_it_sets_or_that_exclude_the_linker_are_refused(encoder_dir):
    for flag in ("--page-size=16", "--disable-radix-cache", "--enable-hierarchical-cache"):
        with pytest.raises(ValueError, match=flag.split("=")[0]):
            sglang_command("m", encoder_dir, {}, extra_args=[flag])
    cmd = sglang_command("m", encoder_dir, {}, publish=False)
    assert "--enable-lora" not in cmd and "--disable-prefill-cuda-graph" not in cmd
