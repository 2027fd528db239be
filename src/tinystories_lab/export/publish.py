"""`make publish`: upload an exported model's folder to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from tinystories_lab.errors import UserError, first_line
from tinystories_lab.experiments.runs import out_dir_of
from tinystories_lab.models import select_experiments


def publish(model: str, repo: str, private: bool = False, queues: list[Path] | None = None) -> None:
    """Upload an experiment's exported folder (`make export`) to a Hugging Face Hub model repository.

    Needs a token: the HF_TOKEN environment variable or a cached `hf auth login`; refuses without one.

    Args:
        model: The experiment's name in the queues, e.g. gpt_6L_6H_288D.
        repo: The Hub repository, e.g. your-name/tinystories-gpt-13M (created if it does not exist).
        private: Create the repository as private.
        queues: Queue files to look the name up in (default: experiments.yaml and experiments.demo.yaml).
    """
    import httpx
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if not repo:
        raise UserError(f"Name the Hub repository: `make publish MODEL={model} REPO=your-name/{model}`.")
    token = get_token()
    if not token:
        raise UserError(
            "No Hugging Face token: set HF_TOKEN or run `.venv/bin/hf auth login`, then publish again."
        )
    entry = select_experiments(model, queues)[0]
    folder = out_dir_of(entry) / "hf"
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"{folder} holds no export; run `make export MODEL={entry['name']}` first.")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo, folder_path=folder, commit_message=f"Upload {entry['name']} (tinystories-lab)"
        )
    except HfHubHTTPError as e:  # the Hub answered: a bad token, a name taken, ...
        raise UserError(
            f"The Hugging Face Hub refused the upload ({first_line(e)}); check the token and REPO."
        ) from None
    except (httpx.TransportError, OSError, RuntimeError) as e:  # no network, DNS, a closed connection
        raise UserError(
            f"Could not reach the Hugging Face Hub ({type(e).__name__}: {first_line(e)}); publish again when "
            "this machine is online."
        ) from None
    print(f"{entry['name']}: {folder} -> {url}")
