#!/bin/sh
# Appends the query string as one line to /data/notes, and syncs before answering:
# an acknowledged write is on disk.
printf '%s\n' "$QUERY_STRING" >> /data/notes && sync && printf 'Content-Type: text/plain\r\n\r\nok\n' && exit 0
printf 'Status: 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\nwrite failed\n'
