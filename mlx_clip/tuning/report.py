"""What a sweep leaves: the table of trials, best.yaml (ready for `mlx_clip.train --config`) and
PNG plots (optimisation history, parameter importance, parallel coordinates) drawn by Optuna's
matplotlib backend, so no browser is needed. Framework-free."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..config import config_to_yaml, load_config
from .space import override_text
from .study import settings_of


def table(study: optuna.Study) -> str:
    """One line per trial: number, state, objective, seconds, parameters, and why it failed or stopped."""
    metric = settings_of(study).metric
    rows = [("trial", "state", metric, "seconds", "params", "note")]
    for t in study.get_trials(deepcopy=False):
        value = f"{t.value:.4g}" if t.value is not None else "-"
        if t.state == TrialState.PRUNED and t.intermediate_values:
            value = f"({t.intermediate_values[max(t.intermediate_values)]:.4g})"
        seconds = f"{t.duration.total_seconds():.1f}" if t.duration else "-"
        params = " ".join(f"{k}={override_text(v)}" for k, v in t.params.items())
        rows.append((str(t.number), t.state.name, value, seconds, params, t.user_attrs.get("reason", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:5], widths, strict=True)) + "  " + r[5] for r in rows
    ).rstrip()


def write_best(study: optuna.Study) -> Path | None:
    """runs/<study>/best.yaml: the base config with the best trial's values (the base's train.steps,
    not the trial budget). None while no trial has completed."""
    settings = settings_of(study)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    best = study.best_trial
    overrides = [(k, override_text(v)) for k, v in best.params.items()]
    text = config_to_yaml(load_config(settings.config, overrides, log=None))
    header = (
        f"# best of sweep {study.study_name!r}: trial {best.number}, {settings.metric} = {best.value:.6g}\n"
        f"# base config: {settings.config or '(built-in defaults)'}; "
        f"{', '.join(f'{k}={v}' for k, v in overrides) or 'no parameters'}\n"
    )
    if settings.trial_steps:
        header += f"# (its trial trained {settings.trial_steps} steps; train.steps here is the base's)\n"
    path = Path(settings.out) / "best.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + text)
    return path


def write_plots(study: optuna.Study, log=print) -> list[Path]:
    """runs/<study>/plots/{history,importance,parallel}.png; a plot that cannot be drawn yet (too
    few completed trials) is skipped with a note. Importance is PED-ANOVA, which needs no scikit-learn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    folder = Path(settings_of(study).out) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    plots = {
        "history": lambda: ovm.plot_optimization_history(study),
        "importance": lambda: ovm.plot_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()
        ),
        "parallel": lambda: ovm.plot_parallel_coordinate(study),
    }
    n_done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if n_done < 2:  # an importance needs two values; one point is not yet a history
        log(f"plots not drawn: {n_done} completed trial(s), they need 2")
        return []
    written = []
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = draw()
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            log(f"{name}.png not drawn: {e}")
            continue
        figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        figure.tight_layout()
        figure.savefig(folder / f"{name}.png", dpi=100)
        plt.close(figure)
        written.append(folder / f"{name}.png")
    return written


def write_report(study: optuna.Study, log=print) -> None:
    """The table (printed and runs/<study>/trials.txt), best.yaml and the plots."""
    out = Path(settings_of(study).out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(study)
    (out / "trials.txt").write_text(text + "\n")
    log(text)
    best = write_best(study)
    log(f"best config: {best}" if best else "best config: none yet (no trial has completed)")
    for path in write_plots(study, log):
        log(f"plot: {path}")
