// Built offline against Debian's golang-github-golang-jwt-jwt-dev: the replace points at the
// source that package installs, so nothing is fetched.
module authsidecar/interop

go 1.19

require github.com/golang-jwt/jwt/v4 v4.4.3

replace github.com/golang-jwt/jwt/v4 => /usr/share/gocode/src/github.com/golang-jwt/jwt
