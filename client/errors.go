package client

import (
	"errors"
	"fmt"
	"time"

	"github.com/keyd/keyd/api"
)

// ErrNotRunning matches, under errors.Is, the error of a call made while
// nothing listens on keyd's socket.
var ErrNotRunning = errors.New("keyd is not running")

// NotRunningError is the error of a call that could not connect because
// the socket file is missing or nobody accepts on it.
type NotRunningError struct {
	Socket string // the socket path dialled
	Err    error  // the dial error, e.g. syscall.ENOENT
}

func (e *NotRunningError) Error() string {
	return fmt.Sprintf("keyd is not running (socket %s): start it with `keyd --config keys.json` or `systemctl start keyd`", e.Socket)
}

// Is makes errors.Is(err, ErrNotRunning) true.
func (e *NotRunningError) Is(target error) bool { return target == ErrNotRunning }

func (e *NotRunningError) Unwrap() error { return e.Err }

// PermissionError is the error of a call that could not connect because
// the socket's file mode refused this process.
type PermissionError struct {
	Socket string
	Err    error
}

func (e *PermissionError) Error() string {
	return fmt.Sprintf("permission denied connecting to keyd's socket %s: run as a member of the socket's group (keyd --socket-group) or as root", e.Socket)
}

func (e *PermissionError) Unwrap() error { return e.Err }

// apiError returns err's *api.Error, if it has one.
func apiError(err error) (*api.Error, bool) {
	var ae *api.Error
	if errors.As(err, &ae) && ae != nil {
		return ae, true
	}
	return nil, false
}

// IsNoCapacity reports whether err is keyd refusing a lease for lack of
// capacity (code api.CodeNoCapacity), and after how long a retry can
// succeed. retryAfter is 0 when keyd named no time: then no retry will
// succeed until the configuration or a key's state changes.
func IsNoCapacity(err error) (retryAfter time.Duration, ok bool) {
	ae, ok := apiError(err)
	if !ok || ae.Code != api.CodeNoCapacity {
		return 0, false
	}
	d, _ := ae.RetryAfter()
	return d, true
}

// IsUnknownModel reports whether err is keyd refusing a lease for a model
// that no configured key serves.
func IsUnknownModel(err error) bool {
	ae, ok := apiError(err)
	return ok && ae.Code == api.CodeUnknownModel
}

// IsForbidden reports whether err is keyd refusing the call because this
// process's uid lacks the permission (see the access section of keys.json),
// or the socket's file mode refusing the connection.
func IsForbidden(err error) bool {
	var pe *PermissionError
	if errors.As(err, &pe) {
		return true
	}
	ae, ok := apiError(err)
	return ok && ae.Code == api.CodeForbidden
}
