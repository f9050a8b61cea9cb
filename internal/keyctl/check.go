package keyctl

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"strings"

	"github.com/keyd/keyd/internal/config"
)

var checkCmd = &command{
	name:  "check",
	args:  "[keys.json] [--env-file F] [--strict] [--json]",
	short: "check a config file offline: keys, secrets, models, limits, warnings",
	long: `Check loads a config file the way keyd does, without talking to keyd, and
prints the whole diagnosis at once: how many keys keyd could lease, which
lack a secret and how to fix it, each key's models, each quota bucket's
limits, and every warning. Secrets never appear: only where each came from
and its last characters.

The file defaults to $KEYD_CONFIG, else ./keys.json. Secrets are looked up
as keyd would from this shell: the environment, the .env file, then
$CREDENTIALS_DIRECTORY.

Exits 1 when the file is not valid, and with --strict also when there is any
warning or missing secret.`,
	setup: func(e *env, fs *flag.FlagSet) func(context.Context, []string) error {
		envFile := fs.String("env-file", "", "`F`: the .env file of GEMINI_KEY_<key_id>=... secrets (default: .env beside keys.json)")
		strict := fs.Bool("strict", false, "exit 1 on any warning or missing secret")
		asJSON := fs.Bool("json", false, "print the diagnosis as JSON")
		return func(ctx context.Context, args []string) error {
			if len(args) > 1 {
				return usagef("check", "unexpected argument %q: check takes one config file", args[1])
			}
			path := e.getenv("KEYD_CONFIG")
			if len(args) == 1 {
				path = args[0]
			}
			if path == "" {
				path = "keys.json"
			}
			cfg, err := config.Load(path, config.Options{EnvFile: *envFile, Getenv: e.getenv})
			if err != nil {
				if *asJSON {
					e.printJSON(checkResult{Path: path, Error: err.Error()})
				}
				return invalidConfig(path, err)
			}
			res := diagnose(cfg)
			if *asJSON {
				if err := e.printJSON(res); err != nil {
					return err
				}
			} else {
				printCheck(e.stdout, cfg, res)
			}
			if *strict && (len(res.Warnings) > 0 || len(res.MissingSecrets) > 0) {
				return &exitCodeError{code: exitError, msg: fmt.Sprintf("--strict: %s and %s",
					plural(len(res.Warnings), "warning"), plural(len(res.MissingSecrets), "missing secret"))}
			}
			return nil
		}
	},
}

// invalidConfig words Load's error: one problem per line.
func invalidConfig(path string, err error) error {
	if errors.Is(err, config.ErrNotFound) {
		return fmt.Errorf("config file %s does not exist: name it (keyctl check PATH) or set KEYD_CONFIG", path)
	}
	lines := strings.Split(strings.TrimSpace(err.Error()), "\n")
	if len(lines) == 1 {
		return fmt.Errorf("%s is not valid: %s", path, lines[0])
	}
	return fmt.Errorf("%s is not valid (%d problems):\n  %s", path, len(lines), strings.Join(lines, "\n  "))
}

// checkResult is check's diagnosis, also its --json output. It holds no
// secret.
type checkResult struct {
	Path           string        `json:"path"`
	Error          string        `json:"error,omitempty"`
	EnvFile        string        `json:"env_file,omitempty"`
	EnvFileExists  bool          `json:"env_file_exists"`
	KeysTotal      int           `json:"keys_total"`
	KeysLoaded     int           `json:"keys_loaded"`
	SecretsFound   int           `json:"secrets_found"`
	MissingSecrets []string      `json:"missing_secrets"`
	Keys           []checkKey    `json:"keys,omitempty"`
	Buckets        []checkBucket `json:"buckets,omitempty"`
	Models         []string      `json:"models,omitempty"`
	Warnings       []string      `json:"warnings"`
}

type checkKey struct {
	ID           string   `json:"key_id"`
	Project      string   `json:"project"`
	Enabled      bool     `json:"enabled"`
	Priority     int      `json:"priority"`
	WorkloadType string   `json:"workload_type,omitempty"`
	Models       []string `json:"models"`
	SecretEnv    string   `json:"secret_env"`
	SecretSource string   `json:"secret_source,omitempty"`
	SecretHint   string   `json:"secret_hint,omitempty"`
	SecretError  string   `json:"secret_error,omitempty"`
}

type checkBucket struct {
	Project       string   `json:"project"`
	Model         string   `json:"model"`
	RPM           int64    `json:"rpm"`
	TPM           int64    `json:"tpm"`
	RPD           int64    `json:"rpd"`
	BurstCapacity int64    `json:"burst_capacity"`
	Keys          []string `json:"keys"`
}

func diagnose(cfg *config.Config) checkResult {
	sum := cfg.Summary()
	res := checkResult{
		Path:           cfg.Path,
		EnvFile:        cfg.EnvFile,
		KeysTotal:      sum.KeysTotal,
		KeysLoaded:     sum.KeysLoaded,
		SecretsFound:   sum.SecretsFound,
		MissingSecrets: sum.MissingSecrets,
		Models:         cfg.Models(),
		Warnings:       cfg.Warnings,
	}
	if res.MissingSecrets == nil {
		res.MissingSecrets = []string{}
	}
	if res.Warnings == nil {
		res.Warnings = []string{}
	}
	if cfg.EnvFile != "" {
		_, err := os.Stat(cfg.EnvFile)
		res.EnvFileExists = !errors.Is(err, fs.ErrNotExist)
	}
	keysOf := map[config.BucketID][]string{}
	for _, k := range cfg.Keys {
		res.Keys = append(res.Keys, checkKey{
			ID:           k.ID,
			Project:      k.Project,
			Enabled:      k.Enabled,
			Priority:     k.Priority,
			WorkloadType: k.WorkloadType,
			Models:       k.ModelNames(),
			SecretEnv:    k.SecretEnv,
			SecretSource: k.SecretSource,
			SecretHint:   k.SecretHint(),
			SecretError:  k.SecretError,
		})
		for _, m := range k.ModelNames() {
			id := config.BucketID{Project: k.Project, Model: m}
			keysOf[id] = append(keysOf[id], k.ID)
		}
	}
	for id, lim := range cfg.Buckets {
		res.Buckets = append(res.Buckets, checkBucket{
			Project: id.Project, Model: id.Model,
			RPM: lim.RPM, TPM: lim.TPM, RPD: lim.RPD, BurstCapacity: lim.BurstCapacity,
			Keys: keysOf[id],
		})
	}
	slices.SortFunc(res.Buckets, func(a, b checkBucket) int {
		return strings.Compare(a.Project+"\x00"+a.Model, b.Project+"\x00"+b.Model)
	})
	return res
}

func printCheck(w io.Writer, cfg *config.Config, res checkResult) {
	fmt.Fprintf(w, "config: %s\n", res.Path)
	if res.EnvFile != "" {
		exists := ""
		if !res.EnvFileExists {
			exists = " (not found)"
		}
		fmt.Fprintf(w, "env file: %s%s\n", res.EnvFile, exists)
	}
	var disabled []string
	for _, k := range res.Keys {
		if !k.Enabled {
			disabled = append(disabled, k.ID)
		}
	}
	line := fmt.Sprintf("keys loaded: %d/%d", res.KeysLoaded, res.KeysTotal)
	if res.KeysLoaded < res.KeysTotal {
		line += " (keyd leases enabled keys with a secret"
		if len(disabled) > 0 {
			line += "; disabled: " + strings.Join(disabled, ", ")
		}
		line += ")"
	}
	fmt.Fprintln(w, line)
	line = fmt.Sprintf("secrets found: %d/%d", res.SecretsFound, res.KeysTotal)
	if len(res.MissingSecrets) > 0 {
		line += " (missing: " + strings.Join(res.MissingSecrets, ", ") + ")"
	}
	fmt.Fprintln(w, line)
	for _, k := range res.Keys {
		if k.SecretError != "" {
			fmt.Fprintf(w, "  %s\n", clean(k.SecretError))
		}
	}

	fmt.Fprintf(w, "\nKEYS: %d\n", len(res.Keys))
	var rows [][]string
	var labels []string
	for _, k := range res.Keys {
		enabled := "yes"
		if !k.Enabled {
			enabled = "no"
		}
		workload := k.WorkloadType
		if workload == "" {
			workload = "-"
		}
		rows = append(rows, []string{k.ID, k.Project, enabled, fmt.Sprint(k.Priority), workload,
			hint(k.SecretHint), sourceWord(k), strings.Join(k.Models, ",")})
		labels = append(labels, k.ID)
	}
	fitTable(w, []string{"KEY", "PROJECT", "ENABLED", "PRIORITY", "WORKLOAD", "SECRET", "FROM", "MODELS"}, rows, labels)

	fmt.Fprintf(w, "\nBUCKETS: %d (limits per project and model)\n", len(res.Buckets))
	tw := newTable(w)
	row(tw, "PROJECT", "MODEL", "RPM", "TPM", "RPD", "BURST", "KEYS")
	for _, b := range res.Buckets {
		row(tw, b.Project, b.Model, fmt.Sprint(b.RPM), fmt.Sprint(b.TPM), orDash(b.RPD), orDash(b.BurstCapacity), strings.Join(b.Keys, ","))
	}
	tw.Flush()

	fmt.Fprintf(w, "\nmodels: %s\n", strings.Join(res.Models, ", "))
	tz := "?"
	if cfg.DayResetLocation != nil {
		tz = cfg.DayResetLocation.String()
	}
	fmt.Fprintf(w, "lease_ttl %s, default_tokens %d, daily quotas reset at midnight %s\n", cfg.LeaseTTL, cfg.DefaultTokens, tz)
	printWarnings(w, res.Warnings)

	switch {
	case res.KeysLoaded == res.KeysTotal && len(res.Warnings) == 0:
		fmt.Fprintf(w, "\nok: keyd would lease all %s\n", plural(res.KeysTotal, "key"))
	case res.KeysLoaded == 0:
		fmt.Fprintf(w, "\nNOT USABLE: keyd would lease none of the %s (%s, %s)\n", plural(res.KeysTotal, "key"),
			plural(len(res.MissingSecrets), "missing secret"), plural(len(res.Warnings), "warning"))
	default:
		fmt.Fprintf(w, "\nvalid: keyd would lease %d of %s (%s, %s)\n", res.KeysLoaded, plural(res.KeysTotal, "key"),
			plural(len(res.MissingSecrets), "missing secret"), plural(len(res.Warnings), "warning"))
	}
}

// sourceWord says in a word where a key's secret came from; the paths are
// printed above the table and in --json.
func sourceWord(k checkKey) string {
	switch src := k.SecretSource; {
	case src == "":
		return "missing $" + k.SecretEnv
	case strings.HasPrefix(src, ".env file "):
		return ".env"
	case strings.HasPrefix(src, "credential "):
		return "credential"
	default:
		return src
	}
}

func orDash(n int64) string {
	if n == 0 {
		return "-"
	}
	return fmt.Sprint(n)
}
