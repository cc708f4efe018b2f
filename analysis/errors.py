"""The one exception type the backend raises for anything a user can fix."""


class HeadroomError(Exception):
    """A problem with the user's input or environment.

    The message says what is wrong and what to do; the CLI prints it as one line and the app shows it
    with ``st.error``. Programming errors stay ordinary exceptions so that they are not mistaken for
    user mistakes.

    ``settings`` names the parameters to change, as the backend calls them (``seqlen``,
    ``max_tokens``). The message names no command-line flag or widget: the CLI and the pages each add
    their own wording for those settings.
    """

    def __init__(self, message: str, *, settings: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.settings = settings
