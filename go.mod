module github.com/keyd/keyd

go 1.26.0

require (
	github.com/joho/godotenv v1.5.1
	go.etcd.io/bbolt v1.5.0
	go.uber.org/goleak v1.3.0
	golang.org/x/sys v0.45.0
	golang.org/x/time v0.16.0
)
