"""The relay administrator's side of chatmaild: the `chatmail` command and the engine
behind `chatmail configure` (render conf/ for this platform, check with the daemons' own
checkers, write, reload), `chatmail status` and `chatmail dns`.

The daemons (chatmaild/*.py beside this package) never import it: they stay small, one
module per service, as upstream keeps them.
"""
