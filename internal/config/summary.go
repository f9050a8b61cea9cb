package config

// Summary is the offline diagnosis keyctl check prints: how many keys the
// file holds, how many keyd can lease, which lack a secret and why.
type Summary struct {
	KeysTotal      int                 // key objects in keys.json
	KeysLoaded     int                 // enabled keys with a secret: the keys keyd leases
	SecretsFound   int                 // keys with a secret, enabled or not
	MissingSecrets []string            // IDs of keys without a secret, in file order
	ModelsPerKey   map[string][]string // key ID → its models, sorted
	// Warnings are Config.Warnings followed by each key's SecretError.
	Warnings []string
}

// Summary summarizes c. It holds no secret.
func (c *Config) Summary() Summary {
	s := Summary{
		KeysTotal:    len(c.Keys),
		ModelsPerKey: make(map[string][]string, len(c.Keys)),
		Warnings:     append([]string(nil), c.Warnings...),
	}
	for _, k := range c.Keys {
		s.ModelsPerKey[k.ID] = k.ModelNames()
		if k.Secret == "" {
			s.MissingSecrets = append(s.MissingSecrets, k.ID)
			s.Warnings = append(s.Warnings, k.SecretError)
			continue
		}
		s.SecretsFound++
		if k.Enabled {
			s.KeysLoaded++
		}
	}
	return s
}
