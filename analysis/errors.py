"""The one exception type the backend raises for anything a user can fix."""


class HeadroomError(Exception):
    """A problem with the user's input or environment.

    The message says what is wrong and what to do; the CLI prints it as one line and the app shows it
    with ``st.error``. Programming errors stay ordinary exceptions so that they are not mistaken for
    user mistakes.
    """
