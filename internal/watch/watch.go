// Package watch tells keyd when its configuration files may have changed.
//
// It watches the directories that hold the files, not the files: editors
// save by writing a new file and renaming it over the old one, and
// Kubernetes swaps a symlinked directory (..data) instead of touching the
// file, so an event on the file's own inode would be missed. Any event in
// a watched directory schedules one call of the callback after a quiet
// period (debounce); the callback compares content and decides. A watched
// directory that disappears is watched again as soon as it is back, and
// its return counts as a change; so does a directory reached through a
// symlink that now points elsewhere (a release directory swapped with
// ln -sfn). Once the watches are in place, changed is called once, so that
// an edit made before Run began is not missed.
package watch

import (
	"context"
	"log/slog"
	"path/filepath"
	"slices"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Run watches the directories of files until ctx is done, calling changed
// (never concurrently with itself) once per burst of events, debounce
// after the last one. It returns ctx's error, or the error of creating the
// watcher.
func Run(ctx context.Context, files []string, debounce time.Duration, log *slog.Logger, changed func()) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return err
	}
	defer w.Close()
	var dirs []string
	for _, f := range files {
		if f == "" {
			continue
		}
		abs, err := filepath.Abs(f)
		if err != nil {
			return err
		}
		if d := filepath.Dir(abs); !slices.Contains(dirs, d) {
			dirs = append(dirs, d)
		}
	}
	watched := map[string]bool{}
	target := map[string]string{} // what each directory resolved to when watched
	// add (re)watches every directory not watched, or whose symlinks now
	// lead elsewhere; true if one came back or moved.
	add := func() bool {
		back := false
		for _, d := range dirs {
			t, _ := filepath.EvalSymlinks(d)
			if watched[d] && t == target[d] {
				continue
			}
			if watched[d] { // the path now leads to another directory
				w.Remove(d)
				watched[d] = false
				log.Info("the config directory now leads elsewhere", "dir", d, "to", t)
			}
			if err := w.Add(d); err == nil {
				target[d] = t
				if _, seen := watched[d]; seen {
					log.Info("watching the config directory again", "dir", d)
					back = true
				}
				watched[d] = true
			} else if _, seen := watched[d]; !seen {
				log.Warn("cannot watch the config directory yet; retrying every second", "dir", d, "err", err)
				watched[d] = false
			}
		}
		return back
	}
	add()
	timer := time.NewTimer(0) // the first check, once watching
	retry := time.NewTicker(time.Second)
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case ev, ok := <-w.Events:
			if !ok {
				return nil
			}
			if watched[ev.Name] && ev.Has(fsnotify.Remove|fsnotify.Rename) {
				// The directory itself went away: its watch is gone.
				w.Remove(ev.Name)
				watched[ev.Name] = false
				log.Warn("the config directory was removed; waiting for it to come back", "dir", ev.Name)
			}
			timer.Reset(debounce)
		case err, ok := <-w.Errors:
			if !ok {
				return nil
			}
			log.Warn("file watcher error; changes may be seen late", "err", err)
			timer.Reset(debounce)
		case <-retry.C:
			if add() {
				timer.Reset(debounce)
			}
		case <-timer.C:
			changed()
		}
	}
}
