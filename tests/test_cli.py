"""The command line as generated from the configs: `--version`, `--config FILE` on every command, SWIRL_ environment
variables, one-line errors naming the field, the old option names as aliases, shell completion, help."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import version

import pytest

from flows.cli import main, resolve


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == version("swirl-factory")


def test_config_file_on_a_subcommand_with_options_on_top(tmp_path):
    file = tmp_path / "generate.yaml"
    file.write_text("samples: 9\nlimit: 3\npolicy: openai/m@http://127.0.0.1:9/v1\ncluster: {n_workers: 1}\n")
    config = resolve(["generate", "--config", str(file), "--samples", "2", "--temperature", "0.1"])
    assert (config.samples, config.limit, config.cluster.n_workers) == (2, 3, 1)  # the command line wins over the file
    assert (config.policy.model, config.policy.api_base, config.policy.temperature) == ("openai/m", "http://127.0.0.1:9/v1", 0.1)
    # The same for a command whose config has a required field, given only by the file.
    pub = tmp_path / "publish.yaml"
    pub.write_text("repo_id: me/data\n")
    assert resolve(["publish", "--config", str(pub), "--dry-run"]).repo_id == "me/data"
    curate = tmp_path / "curate.yaml"
    curate.write_text("judge: {model: openai/j, api_base: 'http://127.0.0.1:9/v1'}\njudge_samples: 3\n")
    judged = resolve(["curate", "--config", str(curate), "--judge-identity", "j"])
    assert (judged.judge.identity, judged.judge_samples, judged.judge.temperature) == ("j", 3, 0.0)  # a judge is greedy


def test_environment_variables_sit_between_the_file_and_the_command_line(tmp_path, monkeypatch):
    file = tmp_path / "generate.yaml"
    file.write_text("samples: 9\nlimit: 3\n")
    monkeypatch.setenv("SWIRL_GENERATE_SAMPLES", "7")
    monkeypatch.setenv("SWIRL_GENERATE_POLICY_API_BASE", "http://127.0.0.1:9/v1")
    config = resolve(["generate", "--config", str(file), "--policy", "openai/m"])
    assert (config.samples, config.limit, config.policy.api_base) == (7, 3, "http://127.0.0.1:9/v1")
    assert resolve(["generate", "--samples", "4"]).samples == 4
    monkeypatch.setenv("SWIRL_GENERATE_SAMPLES", "0")
    assert main(["generate"]) == 2


def test_an_unknown_key_or_a_bad_value_fails_in_one_line_naming_the_field(tmp_path, capsys):
    file = tmp_path / "generate.yaml"
    file.write_text("sample: 10\n")
    assert main(["generate", "--config", str(file), "--db", str(tmp_path / "x.duckdb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("swirl generate: error: sample: Extra inputs are not permitted"), err
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("generate: {sample: 10}\n")
    assert main(["run", "--config", str(pipeline), "--db", str(tmp_path / "x.duckdb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "generate.sample: Extra inputs are not permitted" in err, err
    assert main(["generate", "--samples", "0", "--db", str(tmp_path / "x.duckdb")]) == 2
    err = capsys.readouterr().err
    assert err == "swirl generate: error: samples: Input should be greater than or equal to 1\n", err
    assert main(["generate", "--sampels", "3"]) == 2
    assert "Unknown option: --sampels. Did you mean --samples?" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(tmp_path / "o")]) == 2  # the method: required, by the config
    assert "settings.method: Field required" in capsys.readouterr().err
    assert not (tmp_path / "x.duckdb").exists()


def test_old_option_names_still_work_as_aliases():
    url = "http://127.0.0.1:9/v1"
    old = resolve(["generate", "--policy", "openai/m", "--policy-api-base", url, "--rpm", "5", "--tpm", "100", "--timeout", "3"])
    new = resolve(["generate", "--policy", f"openai/m@{url}", "--requests-per-minute", "5", "--tokens-per-minute", "100",
                   "--timeout-s", "3"])
    assert old == new and old.policy.resolved_identity == f"openai/m@{url}"
    old = resolve(["train", "--method", "swirl", "--output", "o", "--lora", "--batch-size", "8", "--grad-accum", "2",
                   "--vllm", "server", "--vllm-server-base-url", "http://127.0.0.1:8000", "--judge", "openai/j",
                   "--judge-api-base", url, "--public", "--max-completion-length", "256"])
    new = resolve(["train", "--method", "swirl", "--output-dir", "o", "--use-lora", "--per-device-batch-size", "8",
                   "--gradient-accumulation", "2", "--use-vllm", "--vllm-mode", "server", "--vllm-server-base-url",
                   "http://127.0.0.1:8000", "--judge", f"openai/j@{url}", "--no-private", "--max-completion-length", "256"])
    assert old == new and (old.settings.use_lora, old.settings.vllm_mode, old.private) == (True, "server", False)
    assert resolve(["train", "--method", "swirl", "--output", "o"]).judge.temperature == 0.0  # the reward judge is greedy
    assert resolve(["judge-eval", "--resamples", "200"]).n_resamples == 200
    assert resolve(["curate", "--run-id", "a", "--run-id", "b"]).run_ids == ["a", "b"]
    assert resolve(["publish", "--repo-id", "me/d", "--public"]).private is False
    assert resolve(["run", "--no-train", "--judge", f"openai/j@{url}"]).curate.judge.api_base == url
    assert resolve(["evaluate", "--no-tools", "--no-step-scores", "--model", f"sft=openai/s@{url}", "--max-tokens", "9"]).models[0].model.max_tokens == 9


def test_help_shows_each_default_once(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one option a line
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--policy-api-base" in out and "--config" in out
    assert out.count("[default: 5]") == 1 and "(default: 5)" not in out
    assert main(["curate", "--help"]) == 0  # a judge's default is its own: greedy
    assert [line.split()[-3:-1] for line in capsys.readouterr().out.splitlines() if "--temperature" in line] == [["[default:", "0.0]"]]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_commands_and_options(tmp_path, capsys):
    assert main(["completion", "bash"]) == 0
    script = tmp_path / "swirl.bash"
    script.write_text(capsys.readouterr().out)

    def complete(*words: str) -> list[str]:
        line = f'source {script}; COMP_WORDS=(swirl {" ".join(words)}); COMP_CWORD={len(words)}; _swirl; echo "${{COMPREPLY[@]}}"'
        return subprocess.run(["bash", "-c", line], capture_output=True, text=True, check=True).stdout.split()

    assert complete("gen") == ["generate"]
    assert "--policy-api-base" in complete("generate", "--policy-a")


def test_the_lower_layers_do_not_import_the_flow_configs():
    """llm/, training/ and tools/ read their own small configs; only the flow configs compose them."""
    code = ("import sys; import swirl_core.llm.factory, swirl_core.training.run, swirl_core.training.launch, "
            "swirl_core.tools.search; print('swirl_core.config' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
