"""coturn: checks of the rendered turnserver configuration.

coturn has no configuration test mode (it logs unknown options and runs anyway), so the
option names are checked by the tests, which start a real turnserver on the rendered file.
What can go wrong at install time is the shared secret: conf/coturn reads it with
read_text(), which renders an empty secret when the file is missing, and coturn would then
refuse every call.
"""


def validate(files, platform):
    problems = []
    for item in files:
        if item.path == platform.turnserver_config:
            problems += secret_problems(item)
    return problems


def option_values(text, name):
    """The values of option `name` in turnserver.conf `text` (name=value lines)."""
    values = []
    for line in text.splitlines():
        key, _, value = line.strip().partition("=")
        if key.strip() == name:
            values.append(value.strip())
    return values


def secret_problems(item):
    if option_values(item.content, "static-auth-secret") in ([], [""]):
        return [f"{item.path}: no TURN secret; create it first with "
                "'python3 -m chatmaild.turn generate-secret PATH GROUP' (PATH: turn_secret_path "
                "in chatmail.ini), then configure again"]
    return []
