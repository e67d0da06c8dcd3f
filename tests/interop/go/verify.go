// Verifies a sidecar token offline against its JWKS with golang-jwt v4 (Debian's
// golang-github-golang-jwt-jwt-dev), into the typed StandardClaims (int64 times, which a
// NumericDate with a fraction cannot fill) and into RegisteredClaims. Usage:
// verify JWKS_FILE TOKEN. Prints the subject; exits non-zero when either refuses the token.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math/big"
	"os"

	jwt "github.com/golang-jwt/jwt/v4"
)

type jwk struct {
	Kid string `json:"kid"`
	Kty string `json:"kty"`
	Crv string `json:"crv"`
	X   string `json:"x"`
	Y   string `json:"y"`
}

func main() {
	raw, err := os.ReadFile(os.Args[1])
	check(err)
	var set struct {
		Keys []jwk `json:"keys"`
	}
	check(json.Unmarshal(raw, &set))
	token := os.Args[2]

	keyFunc := func(t *jwt.Token) (interface{}, error) {
		if _, ok := t.Method.(*jwt.SigningMethodECDSA); !ok || t.Method.Alg() != "ES256" {
			return nil, fmt.Errorf("unexpected algorithm %v", t.Header["alg"])
		}
		for _, k := range set.Keys {
			if k.Kid == t.Header["kid"] && k.Kty == "EC" && k.Crv == "P-256" {
				x, err := base64.RawURLEncoding.DecodeString(k.X)
				if err != nil {
					return nil, err
				}
				y, err := base64.RawURLEncoding.DecodeString(k.Y)
				if err != nil {
					return nil, err
				}
				return &ecdsa.PublicKey{
					Curve: elliptic.P256(),
					X:     new(big.Int).SetBytes(x),
					Y:     new(big.Int).SetBytes(y),
				}, nil
			}
		}
		return nil, fmt.Errorf("kid %v not in the JWKS", t.Header["kid"])
	}

	standard := &jwt.StandardClaims{}
	_, err = jwt.ParseWithClaims(token, standard, keyFunc)
	check(err)
	if !standard.VerifyIssuer("auth-sidecar", true) {
		check(fmt.Errorf("StandardClaims: wrong issuer %q", standard.Issuer))
	}

	registered := &jwt.RegisteredClaims{}
	_, err = jwt.ParseWithClaims(token, registered, keyFunc)
	check(err)

	fmt.Printf("{\"standard\": %q, \"registered\": %q}\n", standard.Subject, registered.Subject)
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "golang-jwt:", err)
		os.Exit(1)
	}
}
