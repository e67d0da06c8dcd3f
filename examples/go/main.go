// A Go app's use of auth-sidecar: issue a token, validate it, check a rate limit, revoke the
// token and see it rejected. Plain grpc-go with its default options; the target is the
// sidecar's --listen, over TCP or a Unix socket:
//
//	go mod tidy    # once, outside this repository's offline tests
//	go run . 127.0.0.1:50051
//	go run . unix:///run/auth-sidecar/api.sock
//
// The stubs beside this file are generated from proto/ by generate.sh.
package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func main() {
	target := "127.0.0.1:50051"
	if len(os.Args) > 1 {
		target = os.Args[1]
	}
	policy := "api"
	if p := os.Getenv("RATE_LIMIT_POLICY"); p != "" {
		policy = p
	}
	// The sidecar is in the same pod, on loopback or a socket: no TLS.
	conn, err := grpc.Dial(target, grpc.WithInsecure())
	if err != nil {
		log.Fatalf("dial %s: %v", target, err)
	}
	defer conn.Close()
	client := NewTokenServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	issued, err := client.Issue(ctx, &IssueRequest{Subject: "go-user"})
	if err != nil {
		log.Fatalf("Issue: %v", err)
	}
	valid, err := client.Validate(ctx, &ValidateRequest{Token: issued.Token})
	if err != nil || !valid.Valid || valid.Subject != "go-user" {
		log.Fatalf("Validate: %v %v", valid, err)
	}
	limit, err := client.CheckRateLimit(ctx, &CheckRateLimitRequest{Policy: policy, Key: "go-user"})
	if err != nil {
		log.Fatalf("CheckRateLimit: %v", err)
	}
	if _, err := client.Revoke(ctx, &RevokeRequest{Target: &RevokeRequest_Token{Token: issued.Token}}); err != nil {
		log.Fatalf("Revoke: %v", err)
	}
	after, err := client.Validate(ctx, &ValidateRequest{Token: issued.Token})
	if err != nil || after.Valid || after.Reason != InvalidReason_INVALID_REASON_REVOKED {
		log.Fatalf("Validate after Revoke: %v %v", after, err)
	}
	// Bad input is a status naming the field, not a crash.
	_, err = client.Issue(ctx, &IssueRequest{})
	if status.Code(err) != codes.InvalidArgument {
		log.Fatalf("Issue without a subject: %v", err)
	}
	fmt.Printf("ok: issued, validated, rate limit allowed=%v remaining=%d, revoked, rejected as %v\n",
		limit.Allowed, limit.Remaining, after.Reason)
}
