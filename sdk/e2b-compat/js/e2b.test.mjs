// E2B's own JavaScript SDK (`e2b` from npm, unmodified) against a live
// `ember server` with real VMs. The server, and E2B_API_URL,
// E2B_SANDBOX_URL and E2B_API_KEY, come from the Python harness
// (sdk/e2b-compat/tests/test_e2b_js.py), which runs `node --test` on this.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { CommandExitError, NotFoundError, Sandbox } from 'e2b'

const run = randomUUID().slice(0, 8)

async function waitFor(cond, what, ms = 30000) {
  const deadline = Date.now() + ms
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 200))
  }
}

test('the lifecycle, commands and files through the JS SDK', async () => {
  const sbx = await Sandbox.create({ metadata: { suite: run }, timeoutMs: 600_000 })
  try {
    const r = await sbx.commands.run('echo hi; echo err >&2')
    assert.equal(r.stdout, 'hi\n')
    assert.equal(r.stderr, 'err\n')
    assert.equal(r.exitCode, 0)
    await assert.rejects(sbx.commands.run('exit 3'), (e) => e instanceof CommandExitError && e.exitCode === 3)
    assert.equal((await sbx.commands.run('whoami; pwd')).stdout, 'user\n/home/user\n')

    const seen = []
    await sbx.commands.run('for i in 1 2 3; do echo $i; sleep 0.2; done', { onStdout: (d) => seen.push(d) })
    assert.equal(seen.join(''), '1\n2\n3\n')

    const bg = await sbx.commands.run('sleep 1; echo done > /tmp/bg', { background: true })
    assert.ok((await sbx.commands.list()).some((p) => p.pid === bg.pid))
    await bg.disconnect()
    await waitFor(() => sbx.files.exists('/tmp/bg'), 'the disconnected process')
    assert.equal(await sbx.files.read('/tmp/bg'), 'done\n')

    const cat = await sbx.commands.run('cat', { background: true, stdin: true })
    await sbx.commands.sendStdin(cat.pid, 'hello\n')
    await sbx.commands.closeStdin(cat.pid)
    assert.equal((await cat.wait()).stdout, 'hello\n')

    const sleeper = await sbx.commands.run('sleep 300', { background: true })
    assert.equal(await sbx.commands.kill(sleeper.pid), true)
    await assert.rejects(sleeper.wait())

    const info = await sbx.files.write('js/a.txt', 'from js')
    assert.equal(info.path, '/home/user/js/a.txt')
    assert.equal(await sbx.files.read('js/a.txt'), 'from js')
    assert.deepEqual((await sbx.files.list('js')).map((e) => e.name), ['a.txt'])
    assert.equal((await sbx.files.rename('js/a.txt', 'js/b.txt')).path, '/home/user/js/b.txt')
    assert.equal(await sbx.files.makeDir('js/d'), true)
    assert.equal(await sbx.files.makeDir('js/d'), false)
    await sbx.files.remove('js')
    assert.equal(await sbx.files.exists('js'), false)
    await assert.rejects(sbx.files.read('no/such'), (e) => e instanceof NotFoundError)

    await sbx.files.makeDir('watched')
    const changes = []
    const handle = await sbx.files.watchDir('watched', (e) => changes.push(`${e.type}:${e.name}`))
    await sbx.files.write('watched/n.txt', 'x')
    await waitFor(() => changes.includes('create:n.txt'), 'the watch event')
    await handle.stop()

    const listed = await Sandbox.list({ query: { metadata: { suite: run } } }).nextItems()
    assert.deepEqual(listed.map((s) => s.sandboxId), [sbx.sandboxId])

    await sbx.files.write('kept.txt', 'across a pause')
    await sbx.pause()
    assert.equal((await Sandbox.getInfo(sbx.sandboxId)).state, 'paused')
    const back = await Sandbox.connect(sbx.sandboxId)
    assert.equal(await back.files.read('kept.txt'), 'across a pause')
    assert.equal((await back.commands.run('echo back')).stdout, 'back\n')
  } finally {
    assert.equal(await Sandbox.kill(sbx.sandboxId), true)
  }
  assert.equal(await Sandbox.kill(sbx.sandboxId), false)
})

test('getHost names a port the server proxies', async () => {
  const sbx = await Sandbox.create({ metadata: { suite: run }, timeoutMs: 600_000 })
  try {
    await sbx.files.write('/tmp/www/index.txt', 'from js\n')
    await sbx.commands.run('python3 -m http.server 8000 --directory /tmp/www', { background: true })
    const host = sbx.getHost(8000)
    assert.equal(host, `8000-${sbx.sandboxId}.e2b.test`)
    const api = process.env.E2B_API_URL
    let body = ''
    await waitFor(async () => {
      const r = await fetch(`${api}/index.txt`, { headers: { 'x-ember-sandbox-id': sbx.sandboxId, 'x-ember-port': '8000' } })
      body = await r.text()
      return r.status === 200
    }, 'the sandbox web server', 60000)
    assert.equal(body, 'from js\n')
  } finally {
    await sbx.kill()
  }
})
