module captchatask.dev/tests/nodeprobe

go 1.22
