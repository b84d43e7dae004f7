#!/bin/sh
# Prints every line written so far.
printf 'Content-Type: text/plain\r\n\r\n'
cat /data/notes 2>/dev/null
