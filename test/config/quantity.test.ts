import t from 'tap'
import { formatBytes, parseQuantity } from '../../config/quantity.js'

void t.test('Kubernetes quantities in bytes', (t) => {
  const cases: Array<[string, number]> = [
    ['1048576', 1_048_576],
    ['0', 0],
    ['512Mi', 512 * 2 ** 20],
    ['1Gi', 2 ** 30],
    ['1.5Gi', 1.5 * 2 ** 30],
    ['1G', 1e9],
    ['100k', 100_000],
    ['1Ki', 1024],
    ['2Ti', 2 * 2 ** 40],
    ['1M', 1e6],
    ['1T', 1e12],
    ['1e9', 1e9],
    ['1E3', 1000],
    ['5e+2', 500],
    ['.5Ki', 512],
    ['1.', 1],
    [' 1Gi ', 2 ** 30],
    ['0.1', 1],
    ['1.0001Ki', 1025],
  ]
  for (const [text, bytes] of cases) t.equal(parseQuantity(text), bytes, JSON.stringify(text))
  t.end()
})

void t.test('bad quantities throw with the text and examples', (t) => {
  for (const text of ['', 'abc', '1 Gi', '1GB', '1gi', '1Mb', '-1', '+1', '1Gi1', '1..5', 'Gi', '0x10', '1e', '1m', '1Ki2']) {
    t.throws(() => parseQuantity(text), { message: /is not a Kubernetes quantity \(examples: 512Mi, 1Gi, 1G, 1048576\)/ }, JSON.stringify(text))
  }
  t.throws(() => parseQuantity('9Ei'), { message: /too large/ })
  t.throws(() => parseQuantity('1e300'), { message: /too large/ })
  t.end()
})

void t.test('formatBytes', (t) => {
  t.equal(formatBytes(0), '0')
  t.equal(formatBytes(1023), '1023')
  t.equal(formatBytes(1536), '1.5Ki')
  t.equal(formatBytes(2 ** 30), '1.0Gi')
  t.equal(formatBytes(512 * 2 ** 20), '512Mi')
  t.equal(formatBytes(3 * 2 ** 40), '3.0Ti')
  t.equal(formatBytes(2 ** 50), '1024Ti', 'Ti is the largest unit')
  t.end()
})
