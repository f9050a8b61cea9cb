module github.com/keyd/keyd

go 1.26
