"""Finding a train task's checkpoints on disk (shared by the train service, runner and job runner)."""

from pathlib import Path


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint-N (one with trainer_state.json, which the trainer writes last) in `folder`.

    A multi-stage run keeps its checkpoints in stage-K/ folders; the latest stage's newest one wins.
    """
    found = []
    for path in [*folder.glob("checkpoint-*"), *folder.glob("stage-*/checkpoint-*")]:
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and (path / "trainer_state.json").is_file():
            stage = path.parent.name.removeprefix("stage-") if path.parent != folder else "0"
            found.append((int(stage) if stage.isdigit() else 0, int(step), str(path)))
    return Path(max(found)[2]) if found else None
