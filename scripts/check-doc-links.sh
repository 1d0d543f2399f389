#!/usr/bin/env bash
# Checks the relative links of README.md and docs/*.md: each `](target)` must name a file that exists,
# and a `#anchor` must name a heading of the file it points into (GitHub's anchors: lower case, spaces
# to hyphens, punctuation dropped, a repeated heading gets -1, -2, ...). Web links are not followed.
# Prints each broken link with its file and line; exits 1 if there is any.
set -euo pipefail
cd "$(dirname "$0")/.."

# The GitHub anchors of a Markdown file's headings, one a line (headings inside ``` blocks do not count).
anchors() {
    awk '
        /^```/ { fenced = !fenced; next }
        fenced { next }
        /^#+ / {
            h = $0
            sub(/^#+ +/, "", h)
            h = tolower(h)
            gsub(/[^a-z0-9 _-]/, "", h)
            gsub(/ /, "-", h)
            if (h in seen) { seen[h]++; print h "-" seen[h] } else { seen[h] = 0; print h }
        }
    ' "$1"
}

# Every link target of a Markdown file as "line<TAB>target" (not inside ``` blocks).
links() {
    awk '
        /^```/ { fenced = !fenced; next }
        fenced { next }
        {
            line = $0
            while (match(line, /\]\([^) ]+\)/)) {
                print NR "\t" substr(line, RSTART + 2, RLENGTH - 3)
                line = substr(line, RSTART + RLENGTH)
            }
        }
    ' "$1"
}

broken=0
checked=0
for file in README.md docs/*.md; do
    dir=$(dirname "$file")
    while IFS=$'\t' read -r line target; do
        case "$target" in
            http://* | https://* | mailto:*) continue ;;
        esac
        checked=$((checked + 1))
        path=${target%%#*}
        anchor=""
        [[ "$target" == *"#"* ]] && anchor=${target#*#}
        if [ -z "$path" ]; then
            resolved=$file
        else
            resolved=$(realpath -m --relative-to=. "$dir/$path")
        fi
        if [ ! -e "$resolved" ]; then
            echo "$file:$line: $target: no such file ($resolved)"
            broken=$((broken + 1))
            continue
        fi
        if [ -n "$anchor" ]; then
            if [[ "$resolved" != *.md ]] || ! anchors "$resolved" | grep -qxF -- "$anchor"; then
                echo "$file:$line: $target: no heading with anchor #$anchor in $resolved"
                broken=$((broken + 1))
            fi
        fi
    done < <(links "$file")
done

if [ "$broken" -gt 0 ]; then
    echo "$broken broken link(s) of $checked checked"
    exit 1
fi
echo "all $checked relative links resolve"
