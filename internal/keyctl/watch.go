package keyctl

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keyd/keyd/api"
)

// Terminal control sequences (xterm, understood by every terminal in use).
const (
	enterScreen = "\x1b[?1049h\x1b[?25l" // alternate screen, cursor hidden
	leaveScreen = "\x1b[?25h\x1b[?1049l" // cursor shown, normal screen back as it was
	homeCursor  = "\x1b[H"
	clearLine   = "\x1b[2K"
	clearBelow  = "\x1b[J"
	reverse     = "\x1b[7m"
	bold        = "\x1b[1m"
	plain       = "\x1b[0m"
)

// watchWidth is the width of a frame when stdout is not a terminal and
// $COLUMNS is not set.
const watchWidth = 80

// maxChanges is how many changes watch remembers.
const maxChanges = 200

var watchCmd = &command{
	name:  "watch",
	args:  "[--interval D] [--once]",
	short: "show status live, with each state change as it happens",
	long: `Watch shows what keyctl status shows, refreshed every --interval and fitted
to the terminal (80 columns are enough), with a CHANGES footer that lists each
change of a key's or bucket's state, a bucket's warning shown or cleared,
reloads and lost contact with keyd, with the time it was seen, e.g.
  12:01:03 flash_02 ready → cooling (429 per-minute quota …)
Rows that changed in the last few seconds are highlighted. Ctrl-C leaves the
terminal as it was before watch started.

When stdout is not a terminal, watch prints one frame per interval, without
escape sequences, 80 columns wide (or $COLUMNS); --once prints one and exits.`,
	setup: func(e *env, fs *flag.FlagSet) func(context.Context, []string) error {
		interval := fs.Duration("interval", time.Second, "refresh every `D`, e.g. 500ms or 5s")
		once := fs.Bool("once", false, "print one frame and exit, without escape sequences")
		return func(ctx context.Context, args []string) error {
			switch {
			case len(args) > 0:
				return usagef("watch", "unexpected argument %q", args[0])
			case *interval < 100*time.Millisecond:
				return usagef("watch", "--interval must be at least 100ms, got %s", *interval)
			}
			ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
			defer stop()
			c := e.client()
			w := &watcher{
				e:        e,
				out:      e.stdout,
				interval: *interval,
				once:     *once,
				fetch: func(ctx context.Context) (*api.Status, error) {
					ctx, cancel := context.WithTimeout(ctx, max(*interval, 5*time.Second))
					defer cancel()
					return c.Status(ctx)
				},
			}
			w.size = fixedSize(e.getenv)
			if f, ok := e.stdout.(*os.File); ok && !*once {
				if _, _, ok := termSize(f); ok {
					w.tty = true
					w.size = func() (int, int) {
						cols, rows, _ := termSize(f)
						return cols, rows
					}
					winch := make(chan os.Signal, 1)
					signal.Notify(winch, syscall.SIGWINCH)
					defer signal.Stop(winch)
					w.resize = winch
				}
			}
			return w.run(ctx)
		}
	},
}

// termSize returns the size of the terminal f is, and false when f is not
// a terminal.
func termSize(f *os.File) (cols, rows int, ok bool) {
	ws, err := unix.IoctlGetWinsize(int(f.Fd()), unix.TIOCGWINSZ)
	if err != nil || ws.Col == 0 {
		return 0, 0, false
	}
	return int(ws.Col), int(ws.Row), true
}

// fixedSize is the frame size off a terminal: $COLUMNS wide, else 80, and
// as tall as it needs.
func fixedSize(getenv func(string) string) func() (int, int) {
	cols := watchWidth
	if n, err := strconv.Atoi(getenv("COLUMNS")); err == nil && n > 0 {
		cols = n
	}
	return func() (int, int) { return cols, 0 }
}

// watcher is one run of keyctl watch. It is used by one goroutine.
type watcher struct {
	e        *env
	out      io.Writer
	fetch    func(context.Context) (*api.Status, error)
	size     func() (cols, rows int) // rows 0: no limit
	tty      bool                    // full-screen frames with escape sequences
	once     bool
	interval time.Duration
	resize   <-chan os.Signal // redraw now; nil off a terminal

	since   time.Time   // when watch started
	last    *api.Status // last status keyd sent
	lastAt  time.Time
	err     error     // of the last fetch
	errAt   time.Time // when keyd stopped answering
	changes []change  // oldest first
}

// change is one state change watch saw.
type change struct {
	at   time.Time
	what string // "flash_02 ready → cooling (429 per-minute…)"
	keys []string
	bkts []string // "project/model"
}

// run shows frames until ctx is done, and leaves the terminal as it found
// it, on a signal too: the signal cancels ctx.
func (w *watcher) run(ctx context.Context) error {
	w.since = w.e.now()
	if w.tty {
		io.WriteString(w.out, enterScreen)
		defer io.WriteString(w.out, leaveScreen)
	}
	tick := time.NewTicker(w.interval)
	defer tick.Stop()
	for {
		st, err := w.fetch(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if w.once && err != nil {
			return err
		}
		w.observe(st, err)
		w.draw()
		if w.once {
			return nil
		}
	wait:
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-tick.C:
				break wait
			case <-w.resize:
				w.draw()
			}
		}
	}
}

// observe takes the answer of one fetch and records what changed.
func (w *watcher) observe(st *api.Status, err error) {
	now := w.e.now()
	if err != nil {
		if w.err == nil {
			w.errAt = now
			if w.last != nil {
				w.record(change{at: now, what: "keyd does not answer: " + oneLine(err.Error())})
			}
		}
		w.err = err
		return
	}
	if w.err != nil && w.last != nil {
		w.record(change{at: now, what: "keyd answers again"})
	}
	w.err = nil
	if w.last != nil {
		for _, c := range diffStatus(w.last, st) {
			c.at = now
			w.record(c)
		}
	}
	w.last, w.lastAt = st, now
}

func (w *watcher) record(c change) {
	w.changes = append(w.changes, c)
	if len(w.changes) > maxChanges {
		w.changes = slices.Delete(w.changes, 0, len(w.changes)-maxChanges)
	}
}

// diffStatus lists what changed from a to b: keys' and buckets' states,
// keys added and removed, buckets' warnings shown and cleared, reloads, a
// restart.
func diffStatus(a, b *api.Status) []change {
	var out []change
	if b.UptimeS < a.UptimeS || b.Version != a.Version {
		out = append(out, change{what: "keyd restarted (version " + b.Version + ")"})
	}
	if !b.Config.LoadedAt.Equal(a.Config.LoadedAt) {
		out = append(out, change{what: fmt.Sprintf("config reloaded: %s", plural(len(b.Keys), "key"))})
	}
	if b.Config.LastError != "" && b.Config.LastError != a.Config.LastError {
		out = append(out, change{what: "reload failed: " + oneLine(b.Config.LastError)})
	}
	old := map[string]api.KeyStatus{}
	for _, k := range a.Keys {
		old[k.KeyID] = k
	}
	seen := map[string]bool{}
	for _, k := range b.Keys {
		seen[k.KeyID] = true
		o, ok := old[k.KeyID]
		switch {
		case !ok:
			out = append(out, change{what: fmt.Sprintf("%s added, %s", k.KeyID, transition("", k.State, k.Reason)), keys: []string{k.KeyID}})
		case o.State != k.State:
			out = append(out, change{what: k.KeyID + " " + transition(o.State, k.State, strings.TrimPrefix(k.Reason, "key "+k.KeyID+": ")), keys: []string{k.KeyID}})
		}
	}
	for _, k := range a.Keys {
		if !seen[k.KeyID] {
			out = append(out, change{what: k.KeyID + " removed"})
		}
	}
	oldB := map[string]api.BucketState{}
	for _, bk := range a.Buckets {
		oldB[bk.Project+"/"+bk.Model] = bk
	}
	// A warning that went away (fixed, reset) is cleared, one that came is
	// new; a warning whose text changed (a new value) is both.
	warnings := func(id string, was, now []string) {
		for _, warning := range was {
			if !slices.Contains(now, warning) {
				out = append(out, change{what: "warning cleared: " + oneLine(warning), bkts: []string{id}})
			}
		}
		for _, warning := range now {
			if !slices.Contains(was, warning) {
				out = append(out, change{what: "warning: " + oneLine(warning), bkts: []string{id}})
			}
		}
	}
	seenB := map[string]bool{}
	for _, bk := range b.Buckets {
		id := bk.Project + "/" + bk.Model
		seenB[id] = true
		o, ok := oldB[id]
		if ok && o.State != bk.State {
			out = append(out, change{what: id + " " + transition(o.State, bk.State, bk.Reason), bkts: []string{id}})
		}
		warnings(id, o.Warnings, bk.Warnings)
	}
	for _, o := range a.Buckets { // a bucket removed from keys.json takes its warnings
		if id := o.Project + "/" + o.Model; !seenB[id] {
			warnings(id, o.Warnings, nil)
		}
	}
	return out
}

// transition writes "ready → cooling (reason)"; the reason only for a
// state that is not ready.
func transition(from, to, reason string) string {
	s := to
	if from != "" {
		s = from + " → " + to
	}
	if reason != "" && to != api.StateReady {
		s += " (" + oneLine(reason) + ")"
	}
	return s
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// draw writes the current frame: on a terminal over the previous one,
// else after it.
func (w *watcher) draw() {
	cols, rows := w.size()
	cols = min(max(cols, 20), lineWidth)
	lines, marks := w.frame(cols, rows)
	var b bytes.Buffer
	if w.tty {
		b.WriteString(homeCursor)
	}
	for i, l := range lines {
		if w.tty {
			b.WriteString(clearLine)
			if marks[i] != "" {
				l = marks[i] + l + plain
			}
		}
		b.WriteString(l)
		switch {
		case !w.tty:
			b.WriteString("\n")
		case i < len(lines)-1: // not on the last row: it would scroll
			b.WriteString("\r\n")
		}
	}
	if w.tty {
		b.WriteString(clearBelow)
	} else {
		b.WriteString("\n")
	}
	w.out.Write(b.Bytes())
}

// frame lays out one frame in at most cols columns and, when rows > 0,
// rows lines: a title, the status, and the changes at the foot. marks
// holds, per line, the escape sequence that highlights it, if any.
func (w *watcher) frame(cols, rows int) (lines, marks []string) {
	now := w.e.now()
	stamp := func(t time.Time) string { return t.In(w.e.loc).Format("15:04:05") }
	title := fmt.Sprintf("keyctl watch, every %s: %s", w.interval, stamp(now))
	if w.tty {
		title += " (Ctrl-C quits)"
	}
	body := []string{title}
	if w.err != nil {
		body = append(body, fmt.Sprintf("! keyd does not answer since %s: %s", stamp(w.errAt), oneLine(w.err.Error())))
		if w.last != nil {
			body = append(body, fmt.Sprintf("! the status below is from %s", stamp(w.lastAt)))
		}
	}
	var status bytes.Buffer
	if w.last != nil {
		w.e.renderStatus(&status, w.last, cols, true)
		body = append(body, strings.Split(strings.TrimRight(status.String(), "\n"), "\n")...)
	}
	bodyMarks := w.highlights(body, now)

	// The footer: the newest changes that fit.
	shown := 5
	if rows > 0 {
		shown = max(1, rows/4)
	}
	var foot []string
	var footMarks []string
	if len(w.changes) == 0 {
		foot = []string{"", "CHANGES: none since " + stamp(w.since)}
		footMarks = []string{"", ""}
	} else {
		n := min(shown, len(w.changes))
		head := fmt.Sprintf("CHANGES (%d):", len(w.changes))
		if n < len(w.changes) {
			head = fmt.Sprintf("CHANGES (last %d of %d):", n, len(w.changes))
		}
		foot = []string{"", head}
		footMarks = []string{"", ""}
		for _, c := range w.changes[len(w.changes)-n:] {
			foot = append(foot, stamp(c.at)+" "+c.what)
			mark := ""
			if w.recent(c, now) {
				mark = bold
			}
			footMarks = append(footMarks, mark)
		}
	}
	if rows > 0 && len(body)+len(foot) > rows {
		keep := max(rows-len(foot), 2)
		cut := len(body) - (keep - 1)
		body = append(body[:keep-1], fmt.Sprintf("… %d more lines: enlarge the terminal", cut))
		bodyMarks = append(bodyMarks[:keep-1], "")
		if len(body)+len(foot) > rows { // a tiny terminal: the title and the changes
			foot = foot[len(foot)-(rows-len(body)):]
			footMarks = footMarks[len(footMarks)-len(foot):]
		}
	}
	lines = append(body, foot...)
	marks = append(bodyMarks, footMarks...)
	for i, l := range lines {
		lines[i] = truncate(clean(l), cols)
	}
	return lines, marks
}

// recent reports whether c is recent enough to highlight: seen in the
// last few seconds, and at least in the last two frames.
func (w *watcher) recent(c change, now time.Time) bool {
	return now.Sub(c.at) < max(5*time.Second, 2*w.interval)
}

// highlights marks the table rows of keys and buckets that changed
// recently.
func (w *watcher) highlights(lines []string, now time.Time) []string {
	keys, bkts := map[string]bool{}, map[string]bool{}
	for _, c := range w.changes {
		if w.recent(c, now) {
			for _, k := range c.keys {
				keys[k] = true
			}
			for _, b := range c.bkts {
				bkts[b] = true
			}
		}
	}
	marks := make([]string, len(lines))
	section := ""
	for i, l := range lines {
		switch {
		case strings.HasPrefix(l, "KEYS:"):
			section = "keys"
			continue
		case strings.HasPrefix(l, "BUCKETS:"):
			section = "buckets"
			continue
		}
		f := strings.Fields(l)
		if len(f) < 2 || strings.HasPrefix(l, " ") {
			continue
		}
		if section == "keys" && keys[f[0]] || section == "buckets" && bkts[f[0]+"/"+f[1]] {
			marks[i] = reverse
		}
	}
	return marks
}
