import t from 'tap'
import { Membership } from '../../../plugins/peers/membership.js'

void t.test('members: self always in, listed once; a peer marked down is out for downMs, then back', (t) => {
  let now = 1000
  const m = new Membership({ self: 'a:1', members: ['b:1', 'a:1', 'c:1', 'b:1'], downMs: 500, now: () => now })
  t.same(m.live(), ['a:1', 'b:1', 'c:1'])
  t.same(m.others(), ['b:1', 'c:1'])
  m.markDown('b:1')
  m.markDown('a:1')
  t.same(m.live(), ['a:1', 'c:1'], 'b is out; this replica is never marked down')
  now += 499
  t.same(m.others(), ['c:1'])
  now += 1
  t.same(m.others(), ['b:1', 'c:1'], 'b rejoins by itself')
  t.same(new Membership({ self: 'x:1', members: ['b:1'] }).live(), ['x:1', 'b:1'], 'self joins a list that does not name it')
  t.end()
})
