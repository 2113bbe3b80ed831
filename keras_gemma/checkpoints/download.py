"""Fetching presets from Kaggle (kagglehub) and the Hugging Face Hub.

kagglehub's own errors say little about why a Gemma download fails; the two
usual reasons are an unaccepted license (Gemma is gated: HTTP 403) and no
network. We turn those into errors that say what to do, with a one-line
cause instead of the chain of urllib3/requests/kagglehub tracebacks behind it
(`raise ... from None`).
"""

KAGGLE_SCHEME = "kaggle://"
HF_SCHEME = "hf://"


class DownloadError(OSError):
    """A preset could not be fetched."""


class GatedModelError(DownloadError, PermissionError):
    """The model's license has not been accepted (or no credentials were given)."""


class NoNetworkError(DownloadError, ConnectionError):
    """The server could not be reached."""


def kaggle_model_url(handle):
    """The Kaggle page of `owner/model/...` (where its license is accepted)."""
    owner, model = handle.split("/")[:2]
    return f"https://www.kaggle.com/models/{owner}/{model}"


def parse_kaggle_handle(handle):
    """`kaggle://owner/model/framework/variation[/version]` -> `owner/model/...`."""
    path = handle[len(KAGGLE_SCHEME):] if handle.startswith(KAGGLE_SCHEME) else handle
    parts = path.strip("/").split("/")
    if len(parts) not in (4, 5) or not all(parts):
        raise ValueError(
            f"Invalid Kaggle handle {handle!r}: expected "
            "kaggle://<owner>/<model>/<framework>/<variation>[/<version>]."
        )
    if len(parts) == 5 and not parts[4].isdigit():
        raise ValueError(f"Invalid Kaggle handle {handle!r}: the version must be a number.")
    return "/".join(parts)


def _cause(error, limit=200):
    """` (cause: <innermost exception>)`: the chain's root in one short line."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    text = " ".join(str(error).split()) or "no message"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f" (cause: {type(error).__name__}: {text})"


def _is_connection_error(error):
    import requests

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (requests.ConnectionError, requests.Timeout, ConnectionError)):
            return True
        error = error.__cause__ or error.__context__
    return False


def kaggle_download(handle):
    """Downloads (or finds in kagglehub's cache) a Kaggle model; returns its local directory."""
    try:
        import kagglehub
        from kagglehub import exceptions as kaggle_errors
    except ImportError:
        raise ImportError("Loading Kaggle presets needs `kagglehub`: `pip install kagglehub`.") from None
    import requests

    path = parse_kaggle_handle(handle)
    url = kaggle_model_url(path)
    try:
        return kagglehub.model_download(path)
    except (kaggle_errors.KaggleApiHTTPError, requests.HTTPError) as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise GatedModelError(
                f"Kaggle refused to serve {KAGGLE_SCHEME}{path} (HTTP {status}). Gemma models are gated: "
                f"sign in to Kaggle, accept the license on the model's page {url} , and give kagglehub "
                "your credentials (KAGGLE_USERNAME and KAGGLE_KEY, or ~/.kaggle/kaggle.json)."
                + _cause(e)
            ) from None
        if status == 404:
            raise DownloadError(
                f"Kaggle has no model {KAGGLE_SCHEME}{path} (HTTP 404). Check the handle; the model's "
                f"variations and versions are listed on {url} ."
                + _cause(e)
            ) from None
        raise DownloadError(f"Downloading {KAGGLE_SCHEME}{path} from Kaggle failed (HTTP {status}).{_cause(e)}") from None
    except kaggle_errors.UnauthenticatedError as e:
        raise GatedModelError(
            f"Kaggle needs credentials for {KAGGLE_SCHEME}{path}: set KAGGLE_USERNAME and KAGGLE_KEY "
            f"(or ~/.kaggle/kaggle.json) and accept the license on {url} ."
            + _cause(e)
        ) from None
    except Exception as e:
        if _is_connection_error(e):
            raise NoNetworkError(
                f"Cannot download {KAGGLE_SCHEME}{path}: Kaggle could not be reached (no network "
                "connection?). Connect to the internet, or load a local copy of the preset by its "
                "directory path. A versioned handle already in kagglehub's cache loads offline."
                + _cause(e)
            ) from None
        raise


def hf_download(handle):
    """Downloads (or finds in the HF cache) a Hugging Face Hub repo; returns its local directory."""
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise ImportError("Loading `hf://` presets needs `huggingface_hub`: `pip install huggingface_hub`.") from None
    repo = handle[len(HF_SCHEME):].strip("/")
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "chat_template.jinja", "*.gguf"]
    try:
        return huggingface_hub.snapshot_download(repo, allow_patterns=patterns)
    except hf_errors.GatedRepoError as e:
        raise GatedModelError(
            f"Hugging Face refused to serve {handle}: the repository is gated. Accept its license on "
            f"https://huggingface.co/{repo} and log in (`huggingface-cli login` or HF_TOKEN)."
            + _cause(e)
        ) from None
    except hf_errors.RepositoryNotFoundError as e:
        raise DownloadError(f"Hugging Face has no repository {repo!r} (or it is private).{_cause(e)}") from None
    except hf_errors.LocalEntryNotFoundError as e:
        raise NoNetworkError(
            f"Cannot download {handle}: the Hugging Face Hub could not be reached (no network, or "
            "HF_HUB_OFFLINE is set) and the files are not in the local cache."
            + _cause(e)
        ) from None
    except Exception as e:
        if _is_connection_error(e):
            raise NoNetworkError(
                f"Cannot download {handle}: the Hugging Face Hub could not be reached (no network "
                "connection?). Connect to the internet, or load a local copy by its directory path."
                + _cause(e)
            ) from None
        raise
