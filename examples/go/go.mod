// Outside this repository: `go mod tidy` fetches the versions. The tests build it offline
// against Debian's golang-google-grpc-dev and golang-google-protobuf-dev instead (GOPATH
// mode), so the code keeps to what grpc-go 1.33 has.
module example.com/authsidecar-client

go 1.19

require (
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)
