"""`rta log`: requests + decisions + outcomes -> logged traffic (Parquet), one job per module.

schema   the logged-traffic layout (names only, no pyarrow: the serving image imports it)
codec    raw request / decision / outcome values -> Arrow rows
files    open files per event hour, rolled to disk (temp, fsync, rename) before offsets commit
service  the consumer-group member: consume -> decode -> join -> buffer -> roll -> commit
cli      `rta log` flags
"""
