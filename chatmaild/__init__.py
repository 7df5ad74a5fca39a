"""chatmaild: the services of a chatmail relay that are not Postfix, Dovecot or OpenDKIM."""

__version__ = "0.1.0"
