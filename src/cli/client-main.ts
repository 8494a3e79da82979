// Runs a qmpd client command (everything but `serve`): builds the command tree, runs it, turns
// what it threw into a message and an exit code; it never starts a daemon.
import { Command, CommanderError } from 'commander'
import { VERSION } from '../version.ts'
import { addClientCommands } from './commands.ts'
import { bashCompletion, zshCompletion } from './completion.ts'
import { describeError, EXIT } from './exit.ts'
import { resolveTarget } from './target.ts'

/** The whole command tree, `serve` included (for help and completion; main.ts runs serve itself). */
export function buildProgram(): Command {
  const program = new Command('qmpd')
    .description(`qmpd ${VERSION}: snapshots, checkpoints and saved state of QEMU VMs over QMP`)
    .version(VERSION, '--version')
    .exitOverride()
    .showHelpAfterError('(qmpd --help lists the commands)')
  program.command('serve').description('run the daemon (qmpd serve --help for its options)').allowUnknownOption().helpOption(false)
  addClientCommands(program)
  program
    .command('completion')
    .description('print a shell completion script: eval "$(qmpd completion bash)"')
    .argument('<shell>', 'bash or zsh')
    .action((shell: string) => {
      if (shell === 'bash') process.stdout.write(bashCompletion(program))
      else if (shell === 'zsh') process.stdout.write(zshCompletion(program))
      else throw new CommanderError(EXIT.usage, 'qmpd.usage', `completion: unknown shell ${shell} (bash or zsh)`)
    })
  return program
}

/** Runs `qmpd ARGV...` (a client command); resolves with the exit code. */
export async function runClient(argv: string[]): Promise<number> {
  const program = buildProgram()
  try {
    await program.parseAsync(argv, { from: 'user' })
    return EXIT.ok
  } catch (err) {
    if (err instanceof CommanderError) {
      if (err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || err.code === 'commander.help') return EXIT.ok
      if (err.code === 'qmpd.usage') process.stderr.write(`qmpd: ${err.message}\n`)
      return EXIT.usage
    }
    let url = '?'
    try {
      url = resolveTarget(program.opts()).url
    } catch {
      // The address itself was bad: the error says so.
    }
    const { message, code } = describeError(err, url)
    process.stderr.write(`qmpd: ${message}\n`)
    return code
  }
}
